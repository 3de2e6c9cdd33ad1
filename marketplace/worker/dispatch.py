"""The API side of the Celery backend: send a computation to a worker, wait for its reply.

For: ``SOM_JOB_BACKEND=celery``. :class:`CeleryPool` has the local pool's ``run(task, timeout=)``
and ``shutdown()`` (:func:`marketplace.services.compute.get_pool` returns one), so HE inference
keeps its code path: failures come back as the same :class:`ComputeError` kinds (``invalid``
is the caller's 422, ``internal`` a 503). :func:`run_job_on_worker` runs a leased
marketplace-hosted job on a worker and returns the sealed result or the failure reason, which
:func:`marketplace.services.jobs.run_marketplace_job` turns into ``complete``/``fail`` as it does
for a local run. What is sent: blob addresses, the *wrapped* data key and AAD, the public plan,
ciphertexts and sealed bytes (opaque); never a plaintext model, a KEK or a secret key. Every
message is signed with the data directory's task key (:func:`marketplace.worker.tasks.sign_message`).

Not for: the worker side (:mod:`marketplace.worker.tasks`) or configuration
(:mod:`marketplace.worker.celery_app`).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from pathlib import Path
from typing import Any

from celery import Celery

from marketplace.services.compute import ComputeError, HETask
from marketplace.settings import Settings
from marketplace.worker.celery_app import TASK_HE, TASK_JOB, make_celery
from marketplace.worker.tasks import b64d, b64e, sign_message, task_key

__all__ = [
    "JOB_GRACE_SECONDS",
    "PING_TIMEOUT_SECONDS",
    "WORKER_SEEN_SECONDS",
    "CeleryPool",
    "call",
    "celery_for",
    "run_job_on_worker",
]

log = logging.getLogger("som.worker")

PING_TIMEOUT_SECONDS = 1.0
"""How long a synchronous request waits for some worker to answer a ping before a 503."""
WORKER_SEEN_SECONDS = 15.0
"""A worker that answered a ping is assumed present for this long (no ping per request)."""
JOB_GRACE_SECONDS = 30.0
"""A job waits for its worker until its deadline plus this (then it fails with ``timeout``)."""

_apps_lock = threading.Lock()


def celery_for(rt: Any) -> Celery:
    """The runtime's sending Celery app (one per runtime, closed with it)."""
    with _apps_lock:
        app = rt.extras.get("worker.celery")
        if app is None:
            app = make_celery(rt.settings)
            rt.extras["worker.celery"] = app
            rt.on_close(app.close)
    return app


def call(app: Celery, name: str, msg: dict[str, Any], *, key_dir: str | Path, timeout: float | None) -> dict[str, Any]:
    """Sign ``msg`` with the task key of ``key_dir``, send task ``name`` and wait for its reply
    dict. Raises ComputeError("internal") if the queue is unreachable, the worker died, or no
    reply came within ``timeout`` seconds."""
    try:
        signed = sign_message(task_key(key_dir, create=True), name, msg)
    except OSError as e:
        raise ComputeError("internal", f"the task key is unavailable ({type(e).__name__})") from None
    try:
        res = app.send_task(name, args=[signed])
    except Exception as e:  # noqa: BLE001 - kombu/redis transport errors of any kind
        log.error("cannot send %s: %s", name, e)
        raise ComputeError("internal", "the compute queue (Redis) is unavailable") from None
    try:
        reply = res.get(timeout=timeout, propagate=True)
    except Exception as e:  # noqa: BLE001 - celery TimeoutError, WorkerLostError, transport errors
        if type(e).__name__ == "TimeoutError":
            with contextlib.suppress(Exception):
                res.revoke()
            raise ComputeError("internal", "computation timed out") from None
        log.error("task %s %s failed: %s", name, res.id, type(e).__name__)
        raise ComputeError("internal", f"compute worker failed ({type(e).__name__})") from None
    finally:
        with contextlib.suppress(Exception):
            res.forget()
    if not isinstance(reply, dict) or "ok" not in reply:
        raise ComputeError("internal", "compute worker sent a malformed reply")
    return reply


class CeleryPool:
    """The local pool's interface over Celery workers (thread-safe)."""

    def __init__(self, settings: Settings, *, app: Celery | None = None) -> None:
        self.app = app or make_celery(settings)
        from marketplace.custody import resolve_key_dir

        self.data_dir = settings.data_dir.resolve()
        self.key_dir = resolve_key_dir(settings, create=False)
        self._owns_app = app is None
        self._lock = threading.Lock()
        self._seen_until = 0.0

    def _require_worker(self) -> None:
        now = time.monotonic()
        if now < self._seen_until:
            return
        try:
            replies = self.app.control.ping(timeout=PING_TIMEOUT_SECONDS)
        except Exception:  # noqa: BLE001
            raise ComputeError("internal", "the compute queue (Redis) is unavailable") from None
        if not replies:
            raise ComputeError("internal", "no compute worker is running (start one with `som worker`)")
        with self._lock:
            self._seen_until = time.monotonic() + WORKER_SEEN_SECONDS

    def run(self, task: HETask, *, timeout: float | None = None) -> bytes:
        """Evaluate on a worker; raises ComputeError like the local pool."""
        self._require_worker()
        msg = {
            "version_id": task.version_id, "model_blob": task.model_blob, "wrapped_key": b64e(task.wrapped_key),
            "aad": task.aad, "keyset_id": task.keyset_id, "keyset_blob": task.keyset_blob,
            "plan_json": task.plan_json, "request": b64e(task.request),
        }
        reply = call(self.app, TASK_HE, msg, key_dir=self.key_dir, timeout=timeout)
        if reply["ok"]:
            return b64d(reply["out"])
        raise ComputeError(str(reply.get("kind", "internal")), str(reply.get("message", "compute failed")))

    def shutdown(self) -> None:
        if self._owns_app:
            with contextlib.suppress(Exception):
                self.app.close()


def run_job_on_worker(
    rt: Any, *, job_id: str, input_blob: str, model_blob: str, wrapped_key: bytes, aad: str, fmt: str,
    kind: str, limits: dict[str, Any], approved_digest: str | None, max_rows: int | None, timeout: float,
) -> tuple[bytes | None, str, str]:
    """Run a leased job on a worker. Returns ``(sealed_result, "", "")`` or ``(None, reason, message)``
    (reasons as :class:`marketplace.agent.compute.JobFailed`; ``timeout``/``error`` for the queue)."""
    msg = {
        "job_id": job_id, "input_blob": input_blob, "model_blob": model_blob, "wrapped_key": b64e(wrapped_key),
        "aad": aad, "format": fmt, "kind": kind, "limits": limits, "approved_digest": approved_digest,
        "max_rows": max_rows, "max_sealed_bytes": rt.settings.max_sealed_bytes,
        "max_decompressed_bytes": rt.settings.max_decompressed_bytes,
        "max_compression_ratio": rt.settings.max_compression_ratio,
    }
    try:
        reply = call(celery_for(rt), TASK_JOB, msg, key_dir=rt.key_dir, timeout=timeout)
    except ComputeError as e:
        reason = "timeout" if e.message == "computation timed out" else "error"
        return None, reason, f"no compute worker finished the job: {e.message}"
    if reply["ok"]:
        return b64d(reply["out"]), "", ""
    return None, str(reply.get("reason", "error"))[:40], str(reply.get("message", "internal error in the worker"))
