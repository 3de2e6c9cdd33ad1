"""HE evaluation at the compute site: one task, and the process pool that runs tasks locally.

For: :func:`run_he_task`, evaluating a compiled model on a consumer's ciphertexts, and
:class:`ComputePool`, the local ``concurrent.futures.ProcessPoolExecutor`` (``settings.workers``
processes, ``spawn``, created lazily on first use) that :class:`marketplace.compute.executor.LocalExecutor`
runs it in (a Celery worker runs the same function, :mod:`marketplace.worker.tasks`). A task
(:class:`HETask`) carries only what evaluation needs: the blob address, wrapped data key and AAD
of the *encrypted* compiled model, the blob address of the consumer's public key set, the public
plan and the request frame. The process opens the blob store and the KEK provider itself
(:func:`marketplace.compute.store.open_store`), decrypts the model only in its own memory, and
caches decrypted models by version id and loaded public contexts by key set id (small LRUs).

Not for: authorization, metering or audit (the API process does those, see
:mod:`marketplace.services.he`); provider-hosted offerings (their agent computes); choosing
where to run (:mod:`marketplace.compute.executor`).

Failures come back as :class:`ComputeError` with a kind: ``"invalid"`` (the request or key set
does not fit the plan: a 422 for the caller) or ``"internal"`` (anything else: the caller
releases the reservation and answers 503). A crashed pool is replaced on next use.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass
from typing import TypeVar

from crypto.envelope import WrappedKey, decrypt_artifact
from crypto.errors import CryptoError, HEError
from crypto.he import CompiledModel, PublicContext, PublicPlan, evaluate
from marketplace.compute.pool import ComputeError, WorkerPool
from marketplace.compute.store import StoreSpec, open_store

__all__ = ["ComputeError", "ComputePool", "HETask", "run_he_task"]

log = logging.getLogger("som.compute")

MODEL_CACHE_SIZE = 8
CONTEXT_CACHE_SIZE = 16


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

_models: OrderedDict[str, CompiledModel] = OrderedDict()
_contexts: OrderedDict[tuple[str, str], PublicContext] = OrderedDict()
_K = TypeVar("_K")
_V = TypeVar("_V")


def _lru_put(cache: OrderedDict[_K, _V], key: _K, value: _V, cap: int) -> None:
    cache[key] = value
    cache.move_to_end(key)
    while len(cache) > cap:
        cache.popitem(last=False)


def _model(task: HETask) -> CompiledModel:
    m = _models.get(task.version_id)
    if m is not None:
        _models.move_to_end(task.version_id)
        return m
    blobs, provider = open_store(task.store)
    wrapped = WrappedKey.from_json(task.wrapped_key.decode())
    plaintext = decrypt_artifact(blobs.get(task.model_blob), wrapped, provider=provider, aad=task.aad.encode())
    m = CompiledModel.from_bytes(plaintext)
    del plaintext
    _lru_put(_models, task.version_id, m, MODEL_CACHE_SIZE)
    return m


def _context(task: HETask, plan: PublicPlan) -> PublicContext:
    key = (task.keyset_id, plan.digest())
    c = _contexts.get(key)
    if c is not None:
        _contexts.move_to_end(key)
        return c
    blobs, _ = open_store(task.store)
    c = PublicContext.from_bytes(blobs.get(task.keyset_blob), plan=plan)
    _lru_put(_contexts, key, c, CONTEXT_CACHE_SIZE)
    return c


def run_he_task(task: HETask) -> bytes:
    """Evaluate ``task`` (runs in a worker process; also callable in-process). Raises ComputeError."""
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
    return 0  # unpickling this function imported this module, hence TenSEAL, once per process


# ---------------------------------------------------------------- API process side


class ComputePool(WorkerPool[HETask, bytes]):
    """The HE worker pool: ``workers`` spawned processes evaluating :func:`run_he_task`."""

    def __init__(self, workers: int) -> None:
        super().__init__(workers, name="compute", task=run_he_task, warm=_warm)
