"""The local worker pool of the compute site: spawned processes that decrypt and evaluate models.

For: :class:`WorkerPool`, one lazily created ``ProcessPoolExecutor`` (spawned: the API process has
threads, so it never forks), warmed once per worker, thread-safe, and replaced when a worker dies;
and :class:`ComputeError`, the one error a computation comes back with. The HE pool
(:mod:`marketplace.compute.he`) and the gateway pool (:mod:`marketplace.compute.gateway`) are two
instances with their own task functions. Not for: what a task does, or Celery workers
(:mod:`marketplace.compute.remote`).
"""

from __future__ import annotations

import logging
import multiprocessing
import threading
from collections.abc import Callable
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any, Generic, TypeVar

__all__ = ["ComputeError", "WorkerPool"]

log = logging.getLogger("som.compute")

T = TypeVar("T")
R = TypeVar("R")


class ComputeError(Exception):
    """A computation failed. ``kind`` is ``"invalid"`` (caller's input) or ``"internal"``."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message

    def __reduce__(self) -> tuple[Any, ...]:  # picklable across the process boundary
        return (ComputeError, (self.kind, self.message))


class WorkerPool(Generic[T, R]):
    """``workers`` spawned processes running ``task`` (a module-level function: it is pickled by
    name); each first runs ``warm`` (imports, caches). Raises :class:`ComputeError` only."""

    def __init__(self, workers: int, *, name: str, task: Callable[[T], R], warm: Callable[[], int]) -> None:
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        self.workers = workers
        self.name = name
        self._task = task
        self._warm = warm
        self._pool: ProcessPoolExecutor | None = None
        self._lock = threading.Lock()
        self._closed = False

    def _executor(self) -> ProcessPoolExecutor:
        with self._lock:
            if self._closed:
                raise ComputeError("internal", f"{self.name} pool is shut down")
            if self._pool is None:
                ctx = multiprocessing.get_context("spawn")  # the API process has threads: never fork
                self._pool = ProcessPoolExecutor(max_workers=self.workers, mp_context=ctx)
                for _ in range(self.workers):
                    self._pool.submit(self._warm)
            return self._pool

    def submit(self, task: T) -> Future[R]:
        return self._executor().submit(self._task, task)

    def run(self, task: T, *, timeout: float | None = None) -> R:
        """Run ``task`` in a worker; a dead pool is replaced for the next call."""
        pool = self._executor()
        try:
            return pool.submit(self._task, task).result(timeout=timeout)
        except ComputeError:
            raise
        except BrokenProcessPool:
            log.error("%s worker died; replacing the pool", self.name)
            with self._lock:
                if self._pool is pool:
                    self._pool = None
            pool.shutdown(wait=False, cancel_futures=True)
            raise ComputeError("internal", f"{self.name} worker died") from None
        except TimeoutError:
            raise ComputeError("internal", "computation timed out") from None

    def shutdown(self) -> None:
        with self._lock:
            self._closed = True
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
