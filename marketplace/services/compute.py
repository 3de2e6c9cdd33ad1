"""The local compute worker pool for marketplace-hosted HE inference.

For: evaluating a compiled model on a consumer's ciphertexts in a separate process
(``concurrent.futures.ProcessPoolExecutor`` with ``settings.workers`` processes, created
lazily on first use, shut down when the app stops). A worker receives only what it needs: the
blob address, wrapped data key and AAD of the *encrypted* compiled model, the blob address of
the consumer's public key set, the public plan and the request frame. It opens the blob store
and the key-encryption-key provider itself, decrypts the model only in its own memory, and
caches decrypted models by version id and loaded public contexts by key set id (small LRUs).

Not for: authorization, metering or audit (the API process does those, see
:mod:`marketplace.services.he`); provider-hosted offerings (their agent computes).

Worker failures come back as :class:`ComputeError` with a kind: ``"invalid"`` (the request or
key set does not fit the plan: a 422 for the caller) or ``"internal"`` (anything else: the
caller releases the reservation and answers 503). A crashed pool is replaced on next use.
"""

from __future__ import annotations

import logging
import multiprocessing
import threading
from collections import OrderedDict
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from marketplace.worker.dispatch import CeleryPool

__all__ = ["ComputeError", "ComputePool", "HETask", "StoreSpec", "get_pool", "run_he_task"]

log = logging.getLogger("som.compute")

MODEL_CACHE_SIZE = 8
CONTEXT_CACHE_SIZE = 16


class ComputeError(Exception):
    """A computation failed. ``kind`` is ``"invalid"`` (caller's input) or ``"internal"``."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message

    def __reduce__(self) -> tuple[Any, ...]:  # picklable across the process boundary
        return (ComputeError, (self.kind, self.message))


@dataclass(frozen=True)
class StoreSpec:
    """How a worker opens the data directory's blob store and KEK provider."""

    data_dir: str
    key_provider: str  # "local" | "env"
    kek: str | None = None  # base64 KEK when key_provider == "env" (never logged)
    key_dir: str = ""  # the key directory (marketplace.custody); "" = <data_dir>/keys (unsafe dev layout)

    def keys_path(self) -> Path:
        """The key directory: ``key_dir``, or ``<data_dir>/keys`` when it is empty."""
        return Path(self.key_dir) if self.key_dir else Path(self.data_dir) / "keys"

    def __repr__(self) -> str:
        return f"StoreSpec(data_dir={self.data_dir!r}, key_provider={self.key_provider!r}, key_dir={self.key_dir!r})"


@dataclass(frozen=True)
class HETask:
    """One HE evaluation: the encrypted model's location, the key set's, the request frame."""

    store: StoreSpec
    version_id: str
    model_blob: str
    wrapped_key: bytes  # WrappedKey JSON
    aad: str
    keyset_id: str
    keyset_blob: str
    plan_json: str
    request: bytes

    def __repr__(self) -> str:
        return f"HETask(version_id={self.version_id!r}, keyset_id={self.keyset_id!r}, request={len(self.request)}B)"


# ---------------------------------------------------------------- worker process side

_stores: dict[StoreSpec, tuple[Any, Any]] = {}
_models: OrderedDict[str, Any] = OrderedDict()
_contexts: OrderedDict[tuple[str, str], Any] = OrderedDict()


def _open_store(spec: StoreSpec) -> tuple[Any, Any]:
    hit = _stores.get(spec)
    if hit is not None:
        return hit
    from marketplace.services.blobstore import BlobStore

    root = Path(spec.data_dir)
    provider: Any
    if spec.key_provider == "env":
        from crypto.keyproviders import EnvKeyProvider

        provider = EnvKeyProvider(environ={"SOM_KEK": spec.kek or ""})
    else:
        from crypto.keyproviders import LocalFileKeyProvider

        provider = LocalFileKeyProvider(spec.keys_path() / "kek.json", create_if_missing=False)
    pair = (BlobStore(root / "blobs"), provider)
    _stores[spec] = pair
    return pair


def _lru_put(cache: OrderedDict[Any, Any], key: Any, value: Any, cap: int) -> None:
    cache[key] = value
    cache.move_to_end(key)
    while len(cache) > cap:
        cache.popitem(last=False)


def _model(task: HETask) -> Any:
    m = _models.get(task.version_id)
    if m is not None:
        _models.move_to_end(task.version_id)
        return m
    from crypto.envelope import WrappedKey, decrypt_artifact
    from crypto.he import CompiledModel

    blobs, provider = _open_store(task.store)
    wrapped = WrappedKey.from_json(task.wrapped_key.decode())
    plaintext = decrypt_artifact(blobs.get(task.model_blob), wrapped, provider=provider, aad=task.aad.encode())
    m = CompiledModel.from_bytes(plaintext)
    del plaintext
    _lru_put(_models, task.version_id, m, MODEL_CACHE_SIZE)
    return m


def _context(task: HETask, plan: Any) -> Any:
    key = (task.keyset_id, plan.digest())
    c = _contexts.get(key)
    if c is not None:
        _contexts.move_to_end(key)
        return c
    from crypto.he import PublicContext

    blobs, _ = _open_store(task.store)
    c = PublicContext.from_bytes(blobs.get(task.keyset_blob), plan=plan)
    _lru_put(_contexts, key, c, CONTEXT_CACHE_SIZE)
    return c


def run_he_task(task: HETask) -> bytes:
    """Evaluate ``task`` (runs in a worker process; also callable in-process). Raises ComputeError."""
    from crypto.errors import CryptoError, HEError
    from crypto.he import PublicPlan, evaluate

    try:
        plan = PublicPlan.from_json(task.plan_json)
        model = _model(task)
        if model.public_plan.digest() != plan.digest():
            raise ComputeError("internal", "the compiled model does not match the offering's plan")
        ctx = _context(task, plan)
        return evaluate(model, ctx, task.request)
    except ComputeError:
        raise
    except (ValueError, TypeError, HEError) as e:
        raise ComputeError("invalid", str(e)[:500]) from None
    except CryptoError as e:  # artifact did not decrypt: the operator's problem, not the caller's
        raise ComputeError("internal", f"compiled model unavailable ({type(e).__name__})") from None
    except Exception as e:  # noqa: BLE001 - a worker must answer, never crash the pool
        raise ComputeError("internal", f"{type(e).__name__}") from None


def _warm() -> int:
    import crypto.he  # noqa: F401  (import TenSEAL once per worker)

    return 0


# ---------------------------------------------------------------- API process side


class ComputePool:
    """A lazily created process pool; thread-safe; replaced if a worker dies."""

    def __init__(self, workers: int) -> None:
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        self.workers = workers
        self._pool: ProcessPoolExecutor | None = None
        self._lock = threading.Lock()
        self._closed = False

    def _executor(self) -> ProcessPoolExecutor:
        with self._lock:
            if self._closed:
                raise ComputeError("internal", "compute pool is shut down")
            if self._pool is None:
                ctx = multiprocessing.get_context("spawn")  # the API process has threads: never fork
                self._pool = ProcessPoolExecutor(max_workers=self.workers, mp_context=ctx)
                for _ in range(self.workers):
                    self._pool.submit(_warm)
            return self._pool

    def submit(self, task: HETask) -> Future[bytes]:
        return self._executor().submit(run_he_task, task)

    def run(self, task: HETask, *, timeout: float | None = None) -> bytes:
        """Evaluate in a worker; raises ComputeError (a dead pool is replaced for the next call)."""
        pool = self._executor()
        try:
            return pool.submit(run_he_task, task).result(timeout=timeout)
        except ComputeError:
            raise
        except BrokenProcessPool:
            log.error("compute worker died; replacing the pool")
            with self._lock:
                if self._pool is pool:
                    self._pool = None
            pool.shutdown(wait=False, cancel_futures=True)
            raise ComputeError("internal", "compute worker died") from None
        except TimeoutError:
            raise ComputeError("internal", "computation timed out") from None

    def shutdown(self) -> None:
        with self._lock:
            self._closed = True
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)


_pool_lock = threading.Lock()


def get_pool(rt: Any) -> ComputePool | CeleryPool:
    """The runtime's pool (one per runtime; shut down with it): local processes, or Celery
    workers when ``settings.job_backend == "celery"`` (same ``run``/``shutdown``, same errors)."""
    with _pool_lock:
        pool = rt.extras.get("he.compute")
        if pool is None:
            if rt.settings.job_backend == "celery":  # scale-out (docs/deployment.md)
                from marketplace.worker.dispatch import CeleryPool, celery_for

                pool = CeleryPool(rt.settings, app=celery_for(rt))
            else:
                pool = ComputePool(rt.settings.workers)
            rt.extras["he.compute"] = pool
            rt.on_close(pool.shutdown)
    return pool  # type: ignore[no-any-return]


def store_spec(rt: Any) -> StoreSpec:
    s = rt.settings
    kek = s.kek.get_secret_value() if (s.key_provider == "env" and s.kek is not None) else None
    if s.key_provider == "env" and kek is None:
        import os

        kek = os.environ.get("SOM_KEK")
    return StoreSpec(data_dir=str(rt.data_dir), key_provider=s.key_provider, kek=kek, key_dir=str(rt.key_dir))
