"""Encrypted (CKKS) inference from the consumer's side: keys stay here, ciphertexts travel.

``infer_encrypted(offering_id, X)`` fetches the offering's public plan, generates (once) and
caches the consumer's CKKS keys locally (``SecretContext.to_bytes`` in a 0600 file under
``key_dir``, default ``~/.cache/som/he``), registers the *public* key set once per contract and
plan, encrypts ``X`` in the plan's layout, sends it with one ``Idempotency-Key`` per request (kept
across retries: :mod:`marketplace.sdk.retry`), decrypts
the result and applies the plan's post-processing. ``last_receipt`` holds the usage receipt.

Not for: anything the server should see in the clear. The secret key never leaves this
machine: only ``public_keyset_bytes()`` (no secret key) and request frames are sent.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from marketplace.sdk.base import BaseClient, SomAPIError

if TYPE_CHECKING:
    import numpy as np

__all__ = ["HEAPI", "default_key_dir"]


def default_key_dir() -> Path:
    """``$SOM_KEY_DIR``, else ``$XDG_CACHE_HOME/som/he``, else ``~/.cache/som/he``."""
    env = os.environ.get("SOM_KEY_DIR")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "som" / "he"


def _write_private(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def decode_receipt(header: str | None) -> dict[str, Any] | None:
    """The receipt from an ``X-Som-Receipt`` header (base64url of canonical JSON)."""
    if not header:
        return None
    pad = "=" * (-len(header) % 4)
    return dict(json.loads(base64.urlsafe_b64decode(header + pad)))


class HEAPI(BaseClient):
    last_receipt: dict[str, Any] | None = None
    last_usage_id: str | None = None

    # -- provider ---------------------------------------------------------------------------

    def compile_version(self, offering_id: str, version: int, calibration: np.ndarray | bytes) -> dict[str, Any]:
        """Compile a version for HE with calibration samples (array (n, d) or .npy bytes)."""
        if not isinstance(calibration, bytes | bytearray | memoryview):
            import numpy as np  # start-up cost: the CLI imports this module for every command

            buf = io.BytesIO()
            np.save(buf, np.asarray(calibration, dtype=np.float64), allow_pickle=False)
            data = buf.getvalue()
        else:
            data = bytes(calibration)
        r = self.request(
            "POST",
            f"/v1/offerings/{offering_id}/versions/{int(version)}/compile",
            content=data,
            headers={"Content-Type": "application/octet-stream"},
        )
        return dict(r.json())

    def set_he_plan(
        self, offering_id: str, plan: dict[str, Any], report: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        """Publish a provider-hosted offering's HE plan (compiled by its agent)."""
        return dict(
            self.request("PUT", f"/v1/offerings/{offering_id}/he/plan", json={"plan": plan, "report": report}).json()
        )

    # -- consumer ---------------------------------------------------------------------------

    def he_plan(self, offering_id: str, contract_id: str | None = None) -> dict[str, Any]:
        """``{"plan", "plan_digest", "report", "version", "hosting"}`` of an offering (under
        ``contract_id``: of the version that contract pinned)."""
        return dict(self.get_json(f"/v1/offerings/{offering_id}/he", contract_id=contract_id))

    def upload_keyset(
        self, data: bytes, *, contract_id: str | None = None, offering_id: str | None = None
    ) -> dict[str, Any]:
        params = {k: v for k, v in {"contract_id": contract_id, "offering_id": offering_id}.items() if v}
        r = self.request(
            "POST",
            "/v1/keysets",
            params=params,
            content=bytes(data),
            headers={"Content-Type": "application/octet-stream"},
        )
        return dict(r.json())

    def list_keysets(self) -> list[dict[str, Any]]:
        return self.paginate("/v1/keysets")

    def delete_keyset(self, keyset_id: str) -> dict[str, Any]:
        return dict(self.request("DELETE", f"/v1/keysets/{keyset_id}").json())

    def infer_raw(
        self,
        offering_id: str,
        request: bytes,
        *,
        keyset_id: str,
        idempotency_key: str | None = None,
        contract_id: str | None = None,
    ) -> bytes:
        """Send one request frame; return the response frame (sets ``last_receipt``).

        One ``Idempotency-Key`` (``idempotency_key``, else a fresh one made once) for every retry
        of this request (``self.retry``): a retry after a lost answer returns the first answer,
        and sending the same key and frame again later fetches the stored result, uncharged."""
        headers = {"Content-Type": "application/octet-stream", "X-Som-Keyset": keyset_id}
        if contract_id:
            headers["X-Som-Contract"] = contract_id
        r = self.request_idempotent(
            "POST",
            f"/v1/offerings/{offering_id}/infer",
            idempotency_key or str(uuid.uuid4()),
            content=bytes(request),
            headers=headers,
        )
        self.last_receipt = decode_receipt(r.headers.get("x-som-receipt"))
        self.last_usage_id = r.headers.get("x-som-usage-id")
        return r.content

    def he_keys(
        self,
        offering_id: str,
        *,
        key_dir: str | os.PathLike[str] | None = None,
        layout: str = "batch",
        plan_info: dict[str, Any] | None = None,
    ) -> Any:
        """The cached (or freshly generated) ``SecretContext`` for an offering's current plan
        (kept in memory too: loading a context with its keys takes milliseconds)."""
        # lazy import: heavy (TenSEAL), only for HE calls
        from crypto.he import PublicPlan, SecretContext

        info = plan_info or self.he_plan(offering_id)
        plan = PublicPlan.from_dict(info["plan"])
        path = self._key_path(plan.digest(), layout, key_dir)
        cache: dict[Path, Any] = self.__dict__.setdefault("_he_key_cache", {})
        sk = cache.get(path)
        if sk is not None:
            return sk
        if path.exists():
            sk = SecretContext.from_bytes(path.read_bytes())
        else:
            sk = SecretContext.generate(plan, layout=layout)  # type: ignore[arg-type]
            _write_private(path, sk.to_bytes())
        cache[path] = sk
        return sk

    def _key_path(self, plan_digest: str, layout: str, key_dir: str | os.PathLike[str] | None) -> Path:
        root = Path(key_dir) if key_dir is not None else default_key_dir()
        server = hashlib.sha256(self.base_url.encode()).hexdigest()[:16]
        return root / f"{server}-{plan_digest.removeprefix('sha256:')[:32]}-{layout}.sk"

    def _pending_path(self, idempotency_key: str, key_dir: str | os.PathLike[str] | None) -> Path:
        """Where the frame sent under ``idempotency_key`` waits for its answer."""
        root = Path(key_dir) if key_dir is not None else default_key_dir()
        name = hashlib.sha256(f"{self.base_url}\n{idempotency_key}".encode()).hexdigest()[:40]
        return root / "pending" / f"{name}.req"

    def _keyset_for(
        self,
        offering_id: str,
        sk: Any,
        *,
        contract_id: str | None,
        key_dir: str | os.PathLike[str] | None,
        refresh: bool = False,
    ) -> str:
        idx_path = self._key_path(sk.plan.digest(), sk.layout, key_dir).with_suffix(".keysets.json")
        index: dict[str, str] = json.loads(idx_path.read_text()) if idx_path.exists() else {}
        slot = f"{offering_id}|{contract_id or '*'}"
        if slot in index and not refresh:
            return index[slot]
        ks = self.upload_keyset(sk.public_keyset_bytes(), contract_id=contract_id, offering_id=offering_id)
        index[slot] = ks["id"]
        _write_private(idx_path, json.dumps(index).encode())
        return str(ks["id"])

    def infer_encrypted(
        self,
        offering_id: str,
        X: np.ndarray,
        *,
        contract_id: str | None = None,
        key_dir: str | os.PathLike[str] | None = None,
        layout: str = "auto",
        batch_size: int | None = None,
        postprocess: bool = True,
        progress: Callable[[int, int], None] | None = None,
        idempotency_key: str | None = None,
    ) -> np.ndarray:
        """Encrypt ``X`` (n, input_dim), infer, decrypt: outputs (n, output_dim).

        ``layout``: ``"batch"`` (slot per sample), ``"single"`` (one ciphertext per sample) or
        ``"auto"`` (``crypto.he.choose_layout``: single for a few samples, batch otherwise; each
        layout has its own key set, registered once). Requests carry at most ``batch_size``
        samples (default: the plan's slot count, capped at the contract's ``max_batch``), so a
        large input is split into as many requests as the contract allows; ``progress(done, total)``
        is called after each.

        Every request has one ``Idempotency-Key``, made once and kept across its retries
        (transport errors, timeouts, 503: ``self.retry``), so a retried request is charged once.
        With ``idempotency_key`` the keys are ``f"{idempotency_key}/{i}"`` for request ``i``: calling
        again with the same key, input, layout and ``batch_size`` returns the stored answers
        without a new charge: until a request's answer is received its encrypted frame is kept
        (0600, ciphertext only) under ``key_dir/pending/`` and sent again as it was (encryption is
        randomised, and the server replays only the very same request).
        """
        import numpy as np  # start-up cost, as above

        # lazy import: heavy (TenSEAL), only for HE calls
        from crypto.he import PublicPlan, choose_layout

        if layout not in ("auto", "batch", "single"):
            raise ValueError(f"layout must be auto|batch|single, got {layout!r}")
        x = np.asarray(X, dtype=np.float64)
        if x.ndim == 1:
            x = x.reshape(1, -1)
        info = self.he_plan(offering_id, contract_id)
        if layout == "auto":
            layout = choose_layout(PublicPlan.from_dict(info["plan"]), max(1, x.shape[0]))
        sk = self.he_keys(offering_id, key_dir=key_dir, layout=layout, plan_info=info)
        if x.ndim != 2 or x.shape[1] != sk.plan.input_dim:
            raise ValueError(f"expected X of shape (n, {sk.plan.input_dim}), got {x.shape}")
        step = batch_size or min(sk.plan.slots, self._max_batch(offering_id, contract_id) or sk.plan.slots)
        keyset_id = self._keyset_for(offering_id, sk, contract_id=contract_id, key_dir=key_dir)
        outs: list[np.ndarray] = []
        base = idempotency_key or str(uuid.uuid4())
        for i, start in enumerate(range(0, x.shape[0], step)):
            key = f"{base}/{i}"
            pending = self._pending_path(key, key_dir) if idempotency_key else None
            if pending is not None and pending.exists():
                req = pending.read_bytes()
            else:
                req = sk.encrypt(x[start : start + step])
                if pending is not None:
                    _write_private(pending, req)
            try:
                resp = self.infer_raw(
                    offering_id, req, keyset_id=keyset_id, idempotency_key=key, contract_id=contract_id
                )
            except SomAPIError as e:
                stale = (
                    e.status == 404
                    or (e.status == 403 and "revoked" in e.message)
                    or (e.status == 409 and "plan" in e.message)
                )
                if not stale:
                    raise
                keyset_id = self._keyset_for(offering_id, sk, contract_id=contract_id, key_dir=key_dir, refresh=True)
                resp = self.infer_raw(
                    offering_id, req, keyset_id=keyset_id, idempotency_key=key, contract_id=contract_id
                )
            outs.append(sk.decrypt(resp, postprocess=postprocess))
            if pending is not None:
                pending.unlink(missing_ok=True)
            if progress is not None:
                progress(min(start + step, x.shape[0]), x.shape[0])
        return np.concatenate(outs, axis=0)

    def _max_batch(self, offering_id: str, contract_id: str | None) -> int | None:
        """The ``max_batch`` of the contract a request will be metered under (None if unknown)."""
        try:
            if contract_id is not None:
                terms = self.get_json(f"/v1/contracts/{contract_id}")["terms"]
            else:
                active = [
                    c
                    for c in self.paginate("/v1/contracts", role="consumer", status="active", offering_id=offering_id)
                    if c.get("offering_id") == offering_id
                ]
                if len(active) != 1:
                    return None
                terms = active[0]["terms"]
            return int(terms["max_batch"])
        except (SomAPIError, KeyError, TypeError, ValueError):
            return None  # the server decides; an unknown cap only means one request per plan batch
