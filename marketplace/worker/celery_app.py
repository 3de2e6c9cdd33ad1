"""The Celery app of scale-out deployments (``SOM_JOB_BACKEND=celery``).

For: one Celery app configured from :class:`~marketplace.settings.Settings`: broker and result
backend are ``settings.redis_url``; JSON messages only (no pickle: whoever can write to Redis
must not get code execution on a worker); a worker takes one task at a time per process
(prefetch 1) and acknowledges on receipt (a task is never run twice: a lost computation is
retried by the API's job lease or by the caller's idempotent retry, never by Redis). Two tasks:

- ``som.he_evaluate`` (:func:`marketplace.worker.tasks.he_evaluate`)
- ``som.run_job`` (:func:`marketplace.worker.tasks.run_marketplace_job`)

API replicas build the same app to *send* tasks by name (:mod:`marketplace.worker.dispatch`);
``som worker`` (:mod:`marketplace.cli.cmd_worker`) runs one. ``celery -A
marketplace.worker.celery_app worker`` works too (the module's ``app`` is built on first access
from the environment).

Not for: the computations (:mod:`marketplace.worker.tasks`) or choosing the backend
(:mod:`marketplace.services.compute` and :mod:`marketplace.services.jobs` do, from settings).
"""

from __future__ import annotations

from typing import Any

from celery import Celery

from marketplace.settings import Settings

__all__ = ["QUEUE", "RESULT_TTL_SECONDS", "TASK_HE", "TASK_JOB", "make_celery"]

TASK_HE = "som.he_evaluate"
TASK_JOB = "som.run_job"
QUEUE = "som"
"""The one queue API replicas send to and workers consume."""
RESULT_TTL_SECONDS = 3600
"""Replies left in Redis (never fetched, e.g. the API replica died) expire after this long."""


def make_celery(settings: Settings | None = None, *, worker: bool = False) -> Celery:
    """A Celery app for ``settings`` (default: from the environment). Does not connect.

    With ``worker=True`` the compute tasks are registered (they open the data directory of
    ``settings`` when they run); API replicas only send by name and need no task bodies.
    """
    s = settings or Settings()
    app = Celery("som", broker=s.redis_url, backend=s.redis_url, set_as_current=False)
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
    if worker:
        _register(app, s)
    return app


def _register(app: Celery, settings: Settings) -> None:
    from celery.app import trace

    from marketplace.worker import tasks

    # Celery logs every return value; ours are ciphertexts and sealed bytes: log the outcome only.
    trace.LOG_SUCCESS = "Task %(name)s[%(id)s] succeeded in %(runtime)ss"
    store = tasks.worker_store(settings)

    @app.task(name=TASK_HE, ignore_result=False)  # type: ignore[untyped-decorator]
    def he_evaluate(msg: dict[str, Any]) -> dict[str, Any]:
        return tasks.he_evaluate(store, msg)

    @app.task(name=TASK_JOB, ignore_result=False)  # type: ignore[untyped-decorator]
    def run_job(msg: dict[str, Any]) -> dict[str, Any]:
        return tasks.run_marketplace_job(store, msg)


def __getattr__(name: str) -> Any:  # ``celery -A marketplace.worker.celery_app``: built lazily
    if name == "app":
        app = make_celery(worker=True)
        globals()["app"] = app
        return app
    raise AttributeError(name)
