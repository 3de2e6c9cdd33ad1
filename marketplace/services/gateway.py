"""The inference gateway: plaintext rows in, predictions out, synchronously, metered once.

For: ``POST /v1/offerings/{id}/predict`` under a contract that allows mode ``gateway``. The flow
of one call (it runs in one threadpool thread of the API process)::

    parse rows (JSON/CSV, finite, <= gateway_max_rows)     gateway_input
    offering -> latest version, artifact (cached)           TargetCache (no DB on a hit)
    reserve n units (one per row)                           metering.reserved: 1 transaction
      marketplace-hosted: ORT in a worker process            compute.gateway (warm LRU)
        (optionally stacked with concurrent calls)          Batcher
      provider-hosted: the agent's long-poll                 gateway_hub (in memory)
    commit: usage record, ledger leaf, receipt              metering.reserved: 1 transaction

The contract (status, validity, mode ``gateway``, quota, rate, ``max_batch``) is read and locked
inside the metering transaction, so it is never cached; only the offering's version and
encrypted-artifact pointers are, invalidated when this process writes an offering or a version
(SQLAlchemy flush events) and after ``gateway_cache_seconds`` otherwise (other replicas).

What it reveals: the compute site sees the rows (a marketplace worker process, or the provider's
agent); the weights stay where they are (decrypted only in worker memory, or never leaving the
agent). Nothing of the rows is stored (the usage record holds their digest); the answer kept for
idempotent replays is AES-256-GCM sealed under a key derived from the Idempotency-Key, which is
itself stored only as a SHA-256, so a DB or backup reader cannot read predictions. See
docs/gateway.md.

Not for: HTTP (``marketplace.api.routes_gateway``), ORT sessions (``marketplace.compute.gateway``).
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from marketplace.compute.gateway import (
    GatewayAnswer,
    GatewayTask,
    get_pool,
    threads_per_worker,
)
from marketplace.compute.he import ComputeError
from marketplace.errors import Conflict, Invalid, MarketplaceError, NotFound, Unavailable
from marketplace.runtime import Runtime
from marketplace.services import audit, metering, monitoring
from marketplace.services.gateway_cache import Batcher, Target, TargetCache
from marketplace.services.gateway_hub import AgentFailed, hub_of
from marketplace.services.gateway_input import JSON, parse_rows, render
from marketplace.services.gateway_replay import open_answer, seal_answer
from marketplace.services.identity import Principal

__all__ = ["MODE", "Answer", "Batcher", "Target", "TargetCache", "predict", "server_timing"]

MODE = "gateway"


# ---------------------------------------------------------------- the offering cache


@dataclass(frozen=True)
class Answer:
    body: bytes
    media_type: str
    units: int
    version: int | None
    usage_id: str | None
    receipt: dict[str, Any] | None
    replay: bool
    timing: dict[str, float]  # ms: queue, model, metering, total


def server_timing(timing: dict[str, float]) -> str:
    """``Server-Timing: queue;dur=0.1, model;dur=0.02, metering;dur=1.3, total;dur=2.0``."""
    return ", ".join(f"{k};dur={timing.get(k, 0.0):.3f}" for k in ("queue", "model", "metering", "total"))


@dataclass
class _Clock:
    start: float = field(default_factory=time.perf_counter)
    queue: float = 0.0
    model: float = 0.0
    metering: float = 0.0

    def ms(self) -> dict[str, float]:
        total = time.perf_counter() - self.start
        return {
            "queue": self.queue * 1e3,
            "model": self.model * 1e3,
            "metering": self.metering * 1e3,
            "total": total * 1e3,
        }


_state_lock = threading.Lock()


def _state(rt: Runtime) -> tuple[TargetCache, Batcher | None]:
    with _state_lock:
        st: tuple[TargetCache, Batcher | None] | None = rt.gateway_state
        if st is None:
            s = rt.settings
            window = s.gateway_batch_window_ms / 1e3
            st = rt.gateway_state = (
                TargetCache(s.gateway_cache_seconds),
                Batcher(window, s.gateway_batch_max_rows) if window > 0 else None,
            )
    return st


def _target(rt: Runtime, p: Principal, offering_id: str) -> Target:
    t = _state(rt)[0].get(rt, offering_id)
    if t.status != "published" and t.org_id != p.org_id and not p.has("admin"):
        raise NotFound(f"offering {offering_id} not found", denied=offering_id)
    return t


def _run_marketplace(rt: Runtime, t: Target, rows: np.ndarray, clock: _Clock, who: audit.Actor) -> np.ndarray:
    if t.version_id is None or t.artifact is None:
        raise Conflict(f"offering {t.offering_id} has no model version to serve yet")
    s = rt.settings
    art_id, blob, wrapped, aad = t.artifact
    pool = get_pool(rt)
    spec = rt.store_spec
    threads = threads_per_worker(s.workers, s.gateway_threads)

    def run(x: np.ndarray) -> GatewayAnswer:
        task = GatewayTask(
            store=spec,
            version_id=t.version_id or "",
            fmt=t.fmt,
            model_blob=blob,
            wrapped_key=wrapped,
            aad=aad,
            rows=x,
            threads=threads,
            cache_size=s.gateway_model_cache,
        )
        return pool.run(task, timeout=s.gateway_compute_timeout_seconds)

    t0 = time.perf_counter()
    batcher = _state(rt)[1]
    try:
        if batcher is None:
            ans = run(rows)
            out = ans.outputs
        else:
            out, ans = batcher.run(t.version_id, rows, run)
    except ComputeError as e:
        if e.kind == "invalid":
            raise Invalid(f"the rows do not fit the model: {e.message}") from None
        raise Unavailable(f"the gateway worker failed: {e.message}", headers={"Retry-After": "1"}) from None
    clock.model = ans.model_s
    clock.queue = max(0.0, time.perf_counter() - t0 - ans.model_s)
    if ans.loaded:  # a worker decrypted the artifact into its memory: audited, once per load
        audit.emit_detached(
            rt.sessions,
            who,
            "artifact.decrypt",
            target=art_id,
            detail={"purpose": "gateway_load", "version": t.version_id},
        )
    return out


def _run_agent(rt: Runtime, t: Target, rows: np.ndarray, clock: _Clock) -> np.ndarray:
    hub = hub_of(rt)
    timeout = rt.settings.gateway_agent_timeout_seconds
    t0 = time.perf_counter()
    pend = hub.submit(t.offering_id, rows)
    try:
        reply = pend.future.result(timeout=timeout)
    except FutureTimeout:
        hub.abandon(pend)
        raise Unavailable(
            f"the provider's agent did not answer within {timeout:g} s; retry", headers={"Retry-After": "1"}
        ) from None
    except AgentFailed as e:
        msg = str(e)
        if msg.startswith("invalid:"):
            raise Invalid(f"the provider's agent refused the rows: {msg[8:].strip()}") from None
        raise Unavailable(f"the provider's agent could not compute this: {msg}", headers={"Retry-After": "1"}) from None
    clock.model = reply.model_s
    clock.queue = max(0.0, time.perf_counter() - t0 - reply.model_s)
    return reply.outputs


def predict(
    rt: Runtime,
    p: Principal,
    offering_id: str,
    body: bytes,
    *,
    media_type: str,
    accept: str,
    idempotency_key: str | None,
    contract_id: str | None,
    who: audit.Actor,
) -> Answer:
    """One gateway call (see the module docstring). Raises Invalid (422: rows, key), NotFound
    (offering invisible, or no contract of yours), PolicyDenied (403/429: mode not allowed,
    batch too large, quota, rate), Conflict (no version; key in flight), Unavailable (503 with
    Retry-After: no agent, agent timeout, worker failure). Every raised MarketplaceError carries
    the ``Server-Timing`` header; the call is reported to :mod:`marketplace.services.monitoring`."""
    clock = _Clock()
    version = 0
    answer = b""
    try:
        p.require("consumer")
        key = metering.check_idempotency_key(idempotency_key)
        rows = parse_rows(body, media_type, max_rows=rt.settings.gateway_max_rows)
        t = _target(rt, p, offering_id)
        version = t.version or 0
        if t.hosting == "marketplace":
            dim = t.input_dim
        else:
            if not hub_of(rt).online(offering_id, within=rt.settings.agent_offline_seconds):
                raise Unavailable(
                    f"no agent of offering {offering_id} is connected for gateway calls; retry later",
                    headers={"Retry-After": "5"},
                )
            dim = hub_of(rt).input_dim(offering_id)
        if dim is not None and rows.shape[1] != dim:
            raise Invalid(f"rows have {rows.shape[1]} columns; the model takes {dim}")
        n = int(rows.shape[0])
        digest = metering.request_digest("gateway", offering_id, accept, str(rows.shape), rows.tobytes())
        m0 = time.perf_counter()
        with metering.reserved(
            rt,
            p,
            offering_id=offering_id,
            mode=MODE,
            units=n,
            idempotency_key=key,
            request_digest=digest,
            contract_id=contract_id,
            batch_size=n,
            actor=who,
        ) as use:
            clock.metering = time.perf_counter() - m0
            if use.replay is None:
                if t.hosting == "marketplace":
                    out = _run_marketplace(rt, t, rows, clock, who)
                else:
                    out = _run_agent(rt, t, rows, clock)
                answer = render(out, accept, version=t.version, units=n)
                sealed = seal_answer(answer, idempotency_key=key, org_id=p.org_id, request_digest=digest)
                c0 = time.perf_counter()
                use.commit(sealed, media_type=accept)
                clock.metering += time.perf_counter() - c0
    except MarketplaceError as e:
        timing = clock.ms()
        e.headers = {**e.headers, "Server-Timing": server_timing(timing)}
        _record(offering_id, version, timing, ok=False, error_class=e.code)
        raise
    except BaseException:
        _record(offering_id, version, clock.ms(), ok=False, error_class="internal")
        raise
    timing = clock.ms()
    _record(offering_id, version, timing, ok=True)
    if use.replay is not None:
        r = use.replay
        body = open_answer(r.body, idempotency_key=key, org_id=p.org_id, request_digest=digest)
        return Answer(body, r.media_type or JSON, n, t.version, r.usage_id, r.receipt, True, timing)
    charged = use.charged
    return Answer(
        answer,
        accept,
        n,
        t.version,
        charged.usage_id if charged else None,
        charged.receipt if charged else None,
        False,
        timing,
    )


def _record(
    offering_id: str, version: int, timing: dict[str, float], *, ok: bool, error_class: str | None = None
) -> None:
    q, m, total = timing["queue"] / 1e3, timing["model"] / 1e3, timing["total"] / 1e3
    monitoring.record_inference(
        offering_id,
        version,
        MODE,
        queue_s=q,
        model_s=m,
        overhead_s=max(0.0, total - q - m),
        ok=ok,
        error_class=error_class,
    )
