"""The Celery app of scale-out workers (``som worker``, ``SOM_JOB_BACKEND=celery``).

For: the configuration of :func:`marketplace.compute.remote.celery_app` with the two compute
tasks registered, each a thin call into :mod:`marketplace.worker.tasks`:

- ``som.he_evaluate`` (:func:`marketplace.worker.tasks.he_evaluate`)
- ``som.run_job`` (:func:`marketplace.worker.tasks.run_marketplace_job`)

``som worker`` (:mod:`marketplace.cli.cmd_worker`) runs one. ``celery -A
marketplace.worker.celery_app worker`` works too (the module's ``app`` is built on first access
from the environment). API replicas send with :class:`marketplace.compute.remote.CeleryExecutor`.

Not for: the computations (:mod:`marketplace.compute`) or choosing the backend
(:func:`marketplace.compute.executor.make_executor`).
"""

from __future__ import annotations

from typing import Any

from celery import Celery
from celery.app import trace

from marketplace.compute.messages import TASK_HE, TASK_JOB
from marketplace.compute.remote import QUEUE, RESULT_TTL_SECONDS, celery_app
from marketplace.settings import Settings
from marketplace.worker import tasks

__all__ = ["QUEUE", "RESULT_TTL_SECONDS", "TASK_HE", "TASK_JOB", "make_celery"]


def make_celery(settings: Settings | None = None, *, worker: bool = False) -> Celery:
    """A Celery app for ``settings`` (default: from the environment). Does not connect.

    With ``worker=True`` the compute tasks are registered (they open the data directory of
    ``settings`` when they run); API replicas only send by name and need no task bodies.
    """
    s = settings or Settings()
    app = celery_app(s)
    if worker:
        _register(app, s)
    return app


def _register(app: Celery, settings: Settings) -> None:
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
