"""Where marketplace-hosted computations run: one :class:`Executor` interface, chosen once from settings.

For: the interface the services use to compute (HE evaluation and marketplace-hosted jobs) without
knowing where: :class:`LocalExecutor` (HE in a local process pool, :class:`~marketplace.compute.he.ComputePool`;
jobs in the calling thread, one of the job threads of :mod:`marketplace.services.jobs`) or
:class:`~marketplace.compute.remote.CeleryExecutor` (both on Celery workers over Redis,
``SOM_JOB_BACKEND=celery``, docs/deployment.md). :func:`make_executor` picks one from
``settings.job_backend``; :attr:`marketplace.runtime.Runtime.executor` holds it.

Both keep the same failure contract::

    run_he(task)     -> result frame | ComputeError(kind="invalid")   the caller's 422
                                     | ComputeError(kind="internal")  503, units released
    run_job(spec)    -> sealed result | JobFailed(reason, message)     stored with the job
                                     | any other exception             the caller fails the job ("error")

Not for: authorization, metering, audit, leases or job state (the services keep those in the
database and use an executor for computation only).
"""

from __future__ import annotations

import threading
from typing import Protocol

from marketplace.compute.he import ComputePool, HETask
from marketplace.compute.hosted import JobSpec, run_hosted_job
from marketplace.compute.jail import JailConfig
from marketplace.compute.store import StoreSpec
from marketplace.settings import Settings

__all__ = ["Executor", "LocalExecutor", "make_executor"]


class Executor(Protocol):
    """Runs computations somewhere; thread-safe; ``shutdown`` once, when the runtime closes."""

    def run_he(self, task: HETask, *, timeout: float | None = None) -> bytes:
        """Evaluate ``task``; the result frame. Raises ComputeError."""
        ...

    def run_job(self, spec: JobSpec, *, timeout: float | None = None) -> bytes:
        """Run the leased job ``spec``; its sealed result. Raises JobFailed."""
        ...

    def shutdown(self) -> None:
        """Stop the workers this executor started (a later call starts new ones)."""
        ...


class LocalExecutor:
    """HE in this machine's process pool (started on first use); jobs in the calling thread.

    A job's ``timeout`` is not needed here: the job's own limits (CPU, memory and wall clock, in
    the jail for ``custom``) bound it, and its thread keeps its lease meanwhile."""

    def __init__(self, store: StoreSpec, *, workers: int, jail: JailConfig | None = None) -> None:
        self.store = store
        self.jail = jail
        self.workers = workers
        self._pool: ComputePool | None = None
        self._lock = threading.Lock()

    def _he_pool(self) -> ComputePool:
        with self._lock:
            if self._pool is None:
                self._pool = ComputePool(self.workers)  # raises ValueError if workers < 1
            return self._pool

    def run_he(self, task: HETask, *, timeout: float | None = None) -> bytes:
        return self._he_pool().run(task, timeout=timeout)

    def run_job(self, spec: JobSpec, *, timeout: float | None = None) -> bytes:
        return run_hosted_job(spec, self.store, jail=self.jail)

    def shutdown(self) -> None:
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown()


def make_executor(settings: Settings, *, store: StoreSpec) -> Executor:
    """The executor of ``settings.job_backend`` (``local`` or ``celery``) for the site ``store``.
    Does not start or connect to anything."""
    if settings.job_backend == "celery":  # scale-out (docs/deployment.md)
        # start-up cost: Celery (and kombu, redis) only load for the celery backend
        from marketplace.compute.remote import CeleryExecutor

        return CeleryExecutor(settings, key_dir=store.keys_path())
    return LocalExecutor(store, workers=settings.workers, jail=settings.jail_config())
