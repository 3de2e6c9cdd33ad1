"""The Celery executor: send a computation to a worker over Redis, wait for its reply.

For: ``SOM_JOB_BACKEND=celery`` (docs/deployment.md). :func:`celery_app` is the one Celery
configuration, used by API replicas to *send* tasks by name and by ``som worker``
(:mod:`marketplace.worker.celery_app`) to run them: broker and result backend are
``settings.redis_url``; JSON messages only (no pickle: whoever can write to Redis must not get
code execution on a worker); a worker takes one task at a time per process (prefetch 1) and
acknowledges on receipt (a task is never run twice: a lost computation is retried by the API's
job lease or by the caller's idempotent retry, never by Redis). :class:`CeleryExecutor` is the
:class:`~marketplace.compute.executor.Executor` over it, with the local executor's failures:
HE failures are :class:`~marketplace.compute.he.ComputeError` kinds (``invalid`` is the
caller's 422, ``internal`` a 503), job failures :class:`~marketplace.compute.jobs.JobFailed`
(``timeout``/``error`` when no worker answered). Every message is signed with the key
directory's task key (:mod:`marketplace.compute.messages`).

Not for: the worker side (:mod:`marketplace.worker.tasks`) or choosing the backend
(:func:`marketplace.compute.executor.make_executor`).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from pathlib import Path
from typing import Any

from celery import Celery

from marketplace.compute.he import ComputeError, HETask
from marketplace.compute.hosted import JobSpec
from marketplace.compute.jobs import JobFailed
from marketplace.compute.messages import (
    TASK_HE,
    TASK_JOB,
    b64d,
    he_message,
    job_message,
    sign_message,
    task_key,
)
from marketplace.settings import Settings

__all__ = [
    "JOB_GRACE_SECONDS",
    "PING_TIMEOUT_SECONDS",
    "QUEUE",
    "RESULT_TTL_SECONDS",
    "WORKER_SEEN_SECONDS",
    "CeleryExecutor",
    "call",
    "celery_app",
]

log = logging.getLogger("som.worker")

QUEUE = "som"
"""The one queue API replicas send to and workers consume."""
RESULT_TTL_SECONDS = 3600
"""Replies left in Redis (never fetched, e.g. the API replica died) expire after this long."""
PING_TIMEOUT_SECONDS = 1.0
"""How long a synchronous request waits for some worker to answer a ping before a 503."""
WORKER_SEEN_SECONDS = 15.0
"""A worker that answered a ping is assumed present for this long (no ping per request)."""
JOB_GRACE_SECONDS = 30.0
"""A job waits for its worker until its deadline plus this (then it fails with ``timeout``)."""


def celery_app(settings: Settings) -> Celery:
    """A Celery app for ``settings`` with no tasks registered. Does not connect."""
    app = Celery("som", broker=settings.redis_url, backend=settings.redis_url, set_as_current=False)
    app.conf.update(
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        result_accept_content=["json"],
        task_default_queue=QUEUE,
        task_acks_late=False,
        worker_prefetch_multiplier=1,
        result_expires=RESULT_TTL_SECONDS,
        broker_connection_retry_on_startup=True,
        broker_transport_options={"visibility_timeout": 4 * 3600},
        worker_send_task_events=False,
        task_send_sent_event=False,
    )
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


class CeleryExecutor:
    """The executor over Celery workers (thread-safe); owns its sending app."""

    def __init__(self, settings: Settings, *, key_dir: Path) -> None:
        self.app = celery_app(settings)
        self.key_dir = key_dir
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

    def run_he(self, task: HETask, *, timeout: float | None = None) -> bytes:
        """Evaluate on a worker; raises ComputeError like the local pool."""
        self._require_worker()
        reply = call(self.app, TASK_HE, he_message(task), key_dir=self.key_dir, timeout=timeout)
        if reply["ok"]:
            return b64d(reply["out"])
        raise ComputeError(str(reply.get("kind", "internal")), str(reply.get("message", "compute failed")))

    def run_job(self, spec: JobSpec, *, timeout: float | None = None) -> bytes:
        """Run a leased job on a worker (waits ``timeout`` plus :data:`JOB_GRACE_SECONDS`).
        Raises JobFailed (reasons as the local run; ``timeout``/``error`` for the queue)."""
        wait = None if timeout is None else timeout + JOB_GRACE_SECONDS
        try:
            reply = call(self.app, TASK_JOB, job_message(spec), key_dir=self.key_dir, timeout=wait)
        except ComputeError as e:
            reason = "timeout" if e.message == "computation timed out" else "error"
            raise JobFailed(reason, f"no compute worker finished the job: {e.message}") from None
        if reply["ok"]:
            return b64d(reply["out"])
        raise JobFailed(
            str(reply.get("reason", "error"))[:40], str(reply.get("message", "internal error in the worker"))
        )

    def shutdown(self) -> None:
        with contextlib.suppress(Exception):
            self.app.close()
