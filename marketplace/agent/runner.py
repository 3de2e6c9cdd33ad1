"""The provider agent process: ``som agent --offering ID --model PATH``.

For: running on the provider's machine beside the weights. It connects outbound only (HTTP
long-poll on ``POST /v1/agent/lease``), authenticates with an agent key, registers its sealing
public key (the private key stays in a 0600 file next to it) together with the provider's signed
statements vouching for that key (``--signing-key``: the Ed25519 key that signs the provider's
offers; consumers refuse to seal to an unvouched key), heartbeats, and for each piece of work:
fetches the input, computes (jobs via :mod:`marketplace.compute.jobs`, HE requests via
:func:`crypto.he.evaluate` on a :class:`crypto.he.PublicContext` from the consumer's key set,
fetched once and cached), posts the result. Gateway calls (plaintext rows, answered synchronously)
come over a second long-poll in their own thread (:mod:`marketplace.agent.gateway_loop`). With
``--calibration`` it compiles the HE plan
locally and publishes only the PUBLIC plan and report. It reconnects with exponential backoff.
Work whose lease it lost (a heartbeat says so, or the check before posting) is abandoned: another
agent has it now.
Not for: anything on the marketplace's side; the weights never leave this process.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import random
import signal
import tempfile
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from crypto.errors import CryptoError, DecryptionError
from crypto.he import CompiledModel, PublicContext, compile_model, compile_report, evaluate
from crypto.sealing import SealKeyPair
from crypto.signing import SigningKey
from marketplace.agent.gateway_loop import GatewayLoop
from marketplace.agent.sealkey import DEFAULT_VALIDITY, sign_seal_key
from marketplace.compute.jail import JailConfig, config_from_env, probe
from marketplace.compute.jobs import (
    JobFailed,
    Limits,
    Model,
    load_model,
    run_job,
    sealed_input_error,
)
from marketplace.compute.payload import open_input, seal_result
from marketplace.sdk.agent_api import AgentAPI
from marketplace.sdk.contracts_api import load_signing_key
from marketplace.sdk.errors import SomAPIError

__all__ = ["AgentConfig", "LeaseLost", "ProviderAgent", "forget_env", "load_seal_key"]

log = logging.getLogger("som.agent")
MAX_INPUT_BYTES = 1 << 30
_KEYSET_CACHE = 8
RESULT_RETRY_SECONDS = 120.0


def load_seal_key(path: Path) -> SealKeyPair:
    """The agent's sealing key pair from ``path`` (raw 32 bytes, 0600), created if missing."""
    try:
        return SealKeyPair.from_private_bytes(path.read_bytes())
    except FileNotFoundError:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        kp = SealKeyPair.generate()
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:  # another agent on this machine made it first
            return SealKeyPair.from_private_bytes(path.read_bytes())
        with os.fdopen(fd, "wb") as f:
            f.write(kp.unsafe_private_bytes())
        return kp


def forget_env(name: str) -> None:
    """Drop ``name`` from this process's environment: from ``os.environ`` (so no child inherits
    it) and from the environment block the kernel shows in ``/proc/<pid>/environ`` (its value
    bytes are overwritten in place). Best effort on non-Linux systems."""
    os.environ.pop(name, None)
    try:
        fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        start, end = int(fields[47]), int(fields[48])  # env_start, env_end (fields 50 and 51)
        block = ctypes.string_at(start, end - start)
    except (OSError, ValueError, IndexError):
        return
    key, pos = name.encode() + b"=", 0
    while (i := block.find(key, pos)) >= 0:
        if i == 0 or block[i - 1] == 0:
            stop = block.find(b"\0", i)
            stop = len(block) if stop < 0 else stop
            ctypes.memset(start + i + len(key), 0, stop - i - len(key))
        pos = i + 1


class LeaseLost(Exception):
    """The marketplace gave this work to another agent (our lease ran out): drop it."""


@dataclass
class AgentConfig:
    url: str
    api_key: str
    model_path: Path
    offering_ids: list[str] = field(default_factory=list)  # empty: every offering of the key
    seal_key_path: Path | None = None
    signing_key_path: Path | None = None  # the provider's offer-signing key: vouches for the sealing key
    calibration_path: Path | None = None
    name: str = ""
    capabilities: tuple[str, ...] = ("predict", "evaluate", "custom", "he_infer", "gateway")
    workdir: Path | None = None
    jail: JailConfig | None = None  # how custom jobs are jailed (default: from the environment)
    lease_wait: float = 20.0
    backoff_max: float = 30.0


class ProviderAgent:
    """One agent: ``run()`` until ``stop`` is set (or ``max_items`` pieces of work are done)."""

    def __init__(self, cfg: AgentConfig, *, http: httpx.Client | None = None) -> None:
        self.cfg = cfg
        data = cfg.model_path.read_bytes()
        fmt = "onnx" if cfg.model_path.suffix.lower() == ".onnx" else "npz"
        self.model: Model = load_model(data, fmt)
        self.seal = load_seal_key(cfg.seal_key_path or cfg.model_path.with_suffix(".seal.key"))
        self.signing_key: SigningKey | None = None
        if cfg.signing_key_path is not None:
            self.signing_key = load_signing_key(cfg.signing_key_path, create=False)
        else:
            log.warning("no --signing-key: consumers will refuse to seal jobs to this agent (HE inference still works)")
        self._vouch_refresh_at = 0.0
        self.api = AgentAPI(cfg.url, cfg.api_key, http=http, timeout=cfg.lease_wait + 60)
        self.agent_id: str | None = None
        self.heartbeat_seconds = 5.0
        self.holding: set[str] = set()
        self.lost: set[str] = set()
        self._lock = threading.Lock()
        self.compiled: CompiledModel | None = None
        self._keysets: OrderedDict[str, PublicContext] = OrderedDict()
        self.done = 0
        self.workdir = cfg.workdir or Path(tempfile.gettempdir()) / f"som-agent-{os.getpid()}"
        self.jail = cfg.jail if cfg.jail is not None else config_from_env()
        self.jail_problem = probe(self.jail) if "custom" in cfg.capabilities else None
        if self.jail_problem is not None:
            if self.jail.unsafe_unjailed:
                log.warning(
                    "SOM_UNSAFE_UNJAILED_CUSTOM_JOBS=true: custom jobs will run WITHOUT a jail (%s)", self.jail_problem
                )
            else:
                log.warning("custom jobs disabled on this agent: the job jail is unavailable (%s)", self.jail_problem)
        if cfg.calibration_path is not None:
            self._compile(data, fmt, cfg.calibration_path)

    # -- setup -----------------------------------------------------------------------------

    def _compile(self, data: bytes, fmt: str, cal_path: Path) -> None:
        cal = np.load(cal_path, allow_pickle=False)
        self.compiled = compile_model(data, fmt, calibration=cal)
        self.report = compile_report(self.compiled, cal[:64]).to_dict()

    def _hello(self) -> None:
        caps = [c for c in self.cfg.capabilities if c != "he_infer" or self.compiled is not None]
        if self.jail_problem is not None and not self.jail.unsafe_unjailed:
            caps.remove("custom")  # never lease code this machine cannot jail
        body: dict[str, Any] = {
            "seal_public": self.seal.public_text(),
            "name": self.cfg.name or f"agent@{os.uname().nodename}",
            "capabilities": caps,
        }
        if self.cfg.offering_ids:
            body["offering_ids"] = self.cfg.offering_ids
        out = self.api.hello(body)
        agent_id = str(out["id"])
        self.offerings = list(out["offering_ids"])
        self.heartbeat_seconds = float(out["heartbeat_seconds"])
        self.cfg.lease_wait = min(self.cfg.lease_wait, float(out["lease_wait_max"]))
        self._vouch(agent_id)
        if self.compiled is not None:
            for oid in self.offerings:
                self.api.plan(oid, self.compiled.public_plan.to_dict(), self.report, agent_id=agent_id)
        self.agent_id = agent_id  # connected only once the sealing key is vouched for
        log.info("agent %s connected for %s", self.agent_id, self.offerings)

    def _vouch(self, agent_id: str, *, now: float | None = None) -> None:
        """Register the provider's signed statements that inputs for each served offering may
        be sealed to this agent's key (valid :data:`DEFAULT_VALIDITY`, renewed at half-life)."""
        if self.signing_key is None:
            return
        now = time.time() if now is None else now
        not_after = datetime.fromtimestamp(now, UTC) + DEFAULT_VALIDITY
        statements = [
            sign_seal_key(
                self.signing_key, offering_id=oid, seal_public=self.seal.public_text(), not_after=not_after
            ).to_dict()
            for oid in self.offerings
        ]
        self.api.seal_statements(statements, agent_id=agent_id)
        self._vouch_refresh_at = now + DEFAULT_VALIDITY.total_seconds() / 2

    # -- loop ------------------------------------------------------------------------------

    def run(self, stop: threading.Event | None = None, *, max_items: int | None = None) -> None:
        stop = stop or threading.Event()
        hb = threading.Thread(target=self._heartbeats, args=(stop,), daemon=True, name="som-agent-heartbeat")
        delay = 0.5
        started = False
        try:
            while not stop.is_set() and (max_items is None or self.done < max_items):
                try:
                    if self.agent_id is None:
                        self._hello()
                        if not started:
                            hb.start()
                            if "gateway" in self.cfg.capabilities:  # plaintext gateway calls, own thread
                                GatewayLoop(self, wait=self.cfg.lease_wait).start(stop)
                            started = True
                    try:
                        item = self.api.lease(self.cfg.lease_wait, agent_id=self.agent_id)
                    except SomAPIError as e:
                        if e.status != 404:
                            raise
                        self.agent_id = None  # the server forgot us (new DB?): say hello again
                        continue
                    delay = 0.5
                    if item is None:
                        continue
                    self._handle(item)
                    self.done += 1
                except (httpx.TransportError, SomAPIError) as e:
                    if isinstance(e, SomAPIError) and e.status in (401, 403):
                        log.error("agent key refused (%s); stopping", e)
                        raise
                    log.warning("agent: %s; retrying in %.1f s", e, delay)
                    stop.wait(delay * (0.5 + random.random()))
                    delay = min(delay * 2, self.cfg.backoff_max)
        finally:
            stop.set()
            if self.agent_id is not None:
                with contextlib.suppress(Exception):
                    self.api.bye(agent_id=self.agent_id, timeout=5)

    def _heartbeats(self, stop: threading.Event) -> None:
        while not stop.wait(self.heartbeat_seconds):
            if self.agent_id is None:
                continue
            with self._lock:
                holding = sorted(self.holding)
            try:
                lost = self.api.heartbeat(holding, agent_id=self.agent_id)
                with self._lock:
                    self.lost.update(lost)
                if self.signing_key is not None and time.time() >= self._vouch_refresh_at and self.agent_id:
                    self._vouch(self.agent_id)
            except (httpx.TransportError, SomAPIError) as e:
                log.warning("heartbeat failed: %s", e)

    def check_lease(self, wid: str) -> None:
        """Raise :class:`LeaseLost` if the marketplace no longer counts ``wid`` as ours (a
        heartbeat said so, or asking now says so; asking also extends the lease)."""
        with self._lock:
            lost = wid in self.lost
        if not lost:
            lost = wid in self.api.heartbeat([wid], agent_id=self.agent_id)
        if lost:
            raise LeaseLost(f"lost the lease on {wid}; another agent has it now")

    # -- work ------------------------------------------------------------------------------

    def _handle(self, item: dict[str, Any]) -> None:
        wid = str(item["id"])
        with self._lock:
            self.holding.add(wid)
        try:
            payload = self.api.payload(wid, agent_id=self.agent_id)
            if item["type"] == "task":
                self._task(wid, item, payload)
            else:
                self._job(wid, item, payload)
        except LeaseLost as e:
            log.info("abandoning %s: %s", wid, e)
        finally:
            with self._lock:
                self.holding.discard(wid)
                self.lost.discard(wid)

    def _post_result(self, wid: str, data: bytes) -> None:
        """Post a result, retrying through a server restart (a duplicate post is harmless).
        Raises :class:`LeaseLost` (nothing posted) if the work is no longer ours."""
        delay, end = 0.5, time.monotonic() + RESULT_RETRY_SECONDS
        while True:
            try:
                self.check_lease(wid)
                self.api.complete(wid, data, agent_id=self.agent_id)
                return
            except SomAPIError as e:
                if e.status == 409:  # cancelled or expired meanwhile: drop it
                    log.info("result for %s discarded: %s", wid, e.message)
                    return
                if e.status < 500 or time.monotonic() > end:
                    raise
            except httpx.TransportError:
                if time.monotonic() > end:
                    raise
            time.sleep(delay)
            delay = min(delay * 2, 5.0)

    def _fail(self, wid: str, reason: str, message: str) -> None:
        with contextlib.suppress(SomAPIError):
            self.api.fail(wid, reason, message, agent_id=self.agent_id)

    def _job(self, wid: str, item: dict[str, Any], payload: bytes) -> None:
        meta = item.get("meta") or {}
        self.check_lease(wid)
        try:
            inp = open_input(self.seal, wid, payload, max_size=MAX_INPUT_BYTES)
        except (DecryptionError, ValueError) as e:
            self._fail(wid, "bad_input", sealed_input_error(e))
            return
        try:
            out = run_job(
                self.model,
                inp,
                expected_kind=str(item["kind"]),
                max_rows=meta.get("max_rows"),
                approved_digest=meta.get("code_digest"),
                limits=Limits.from_dict(meta.get("limits") or {}),
                workdir=self.workdir,
                jail=self.jail,
            )
        except JobFailed as e:
            self._fail(wid, e.reason, e.message)
            return
        self._post_result(wid, seal_result(inp.reply_public, out))

    def _context(self, keyset_id: str, compiled: CompiledModel) -> PublicContext:
        ctx = self._keysets.get(keyset_id)
        if ctx is None:
            data = self.api.keyset(keyset_id, agent_id=self.agent_id)
            ctx = PublicContext.from_bytes(data, plan=compiled.public_plan)
            self._keysets[keyset_id] = ctx
            while len(self._keysets) > _KEYSET_CACHE:
                self._keysets.popitem(last=False)
        else:
            self._keysets.move_to_end(keyset_id)
        return ctx

    def _task(self, wid: str, item: dict[str, Any], payload: bytes) -> None:
        if self.compiled is None:
            self._fail(wid, "no_plan", "this agent has no HE plan (start it with --calibration)")
            return
        meta = item.get("meta") or {}
        try:
            out = evaluate(self.compiled, self._context(str(meta["keyset_id"]), self.compiled), payload)
        except (CryptoError, ValueError, TypeError, KeyError) as e:
            self._fail(wid, "invalid", f"{type(e).__name__}: {e}")
            return
        self._post_result(wid, out)


def run_forever(cfg: AgentConfig) -> None:  # pragma: no cover - the CLI entry point
    agent = ProviderAgent(cfg)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    agent.run(stop)
