"""The job threads of a marketplace process: the sweeper and the local workers.

For: :func:`sweep` (expire overdue jobs, take back lost leases, purge old results, finish charges
a crash interrupted), :class:`Background` (the sweeper thread and ``settings.workers`` threads
that lease marketplace-hosted jobs and run them here) and :func:`ensure_background` (start them
once per runtime). The threads stop with ``rt.close()``.
Not for: what a job computes (:mod:`.local`) or provider-hosted jobs (their agents lease them,
:mod:`marketplace.services.dispatch`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import traceback
from datetime import datetime, timedelta

from sqlalchemy import select

from marketplace.db.base import utcnow
from marketplace.db.models_jobs import Job
from marketplace.runtime import Runtime
from marketplace.services import leases
from marketplace.services.jobs.leasing import lease_local, reap_lost
from marketplace.services.jobs.local import run_marketplace_job
from marketplace.services.jobs.results import charge, fail
from marketplace.services.jobs.states import JobStatus, Settlement, finish, purge

__all__ = ["SWEEP_SECONDS", "Background", "ensure_background", "sweep"]

log = logging.getLogger("som.jobs")

SWEEP_SECONDS = 1.0
_LIVE = (JobStatus.CREATED, JobStatus.QUEUED, JobStatus.AWAITING_APPROVAL, JobStatus.RUNNING)


def sweep(rt: Runtime, *, now: datetime | None = None) -> None:
    """Expire overdue jobs, requeue lost leases, purge old results and the sealed inputs of jobs
    that became final, finish interrupted charges."""
    now = now or utcnow()
    settled: list[Settlement] = []
    old_results: list[str] = []
    with rt.tx() as s:
        settled += reap_lost(s, now)
        for job in s.scalars(select(Job).where(Job.status.in_(_LIVE), Job.finishing.is_(False), Job.deadline_at < now)):
            settled.append(
                finish(
                    s,
                    job,
                    JobStatus.EXPIRED,
                    now=now,
                    event="job.expire",
                    outcome="failure",
                    error="the job did not finish before its deadline",
                    reason="deadline",
                    release="job expired or lost",
                )
            )
        for job in s.scalars(select(Job).where(Job.result_blob.is_not(None), Job.result_expires_at < now)):
            old_results.append(job.result_blob or "")
            job.result_blob = None
        stuck = list(
            s.scalars(select(Job.id).where(Job.finishing.is_(True), Job.updated_at < now - timedelta(seconds=30)))
        )
    for done in settled:
        done.apply(rt)
    purge(rt, *old_results)
    for jid in stuck:
        try:
            charge(rt, jid, result=None)
        except Exception:  # noqa: BLE001 - retried on the next sweep
            log.exception("could not finish job %s", jid)


class Background:
    """The sweeper thread and the worker threads of marketplace-hosted jobs."""

    def __init__(self, rt: Runtime) -> None:
        self.rt = rt
        self.stop = threading.Event()
        self.threads: list[threading.Thread] = []

    def start(self) -> None:
        n = max(1, int(self.rt.settings.workers))
        self.threads.append(threading.Thread(target=self._sweeper, name="som-jobs-sweeper", daemon=True))
        for i in range(n):
            self.threads.append(
                threading.Thread(target=self._worker, args=(i,), name=f"som-jobs-worker-{i}", daemon=True)
            )
        for t in self.threads:
            t.start()

    def close(self) -> None:
        self.stop.set()
        leases.notify(self.rt)
        for t in self.threads:
            t.join(timeout=10)

    def _sweeper(self) -> None:
        while not self.stop.wait(SWEEP_SECONDS):
            try:
                sweep(self.rt)
            except Exception:  # noqa: BLE001 - keep sweeping
                if self.stop.is_set():
                    return
                log.exception("job sweeper failed")

    def _worker(self, i: int) -> None:
        owner = f"worker:{os.getpid()}:{i}"
        bell = leases.bell(self.rt, "work")
        while not self.stop.is_set():
            gen = bell.generation()
            try:
                with self.rt.tx() as s:
                    item = lease_local(self.rt, s, owner, utcnow())
            except Exception:  # noqa: BLE001
                if self.stop.is_set():
                    return
                log.exception("job worker lease failed")
                item = None
            if item is None:
                bell.wait(gen, 0.5)
                continue
            try:
                run_marketplace_job(self.rt, item["id"], owner=owner, stop=self.stop)
            except Exception as e:  # noqa: BLE001 - the job fails, the worker lives
                # the exception's message may quote the consumer's input: log its type and frames only
                log.error(
                    "job worker crashed on %s: %s\n%s",
                    item["id"],
                    type(e).__name__,
                    "".join(traceback.format_tb(e.__traceback__)),
                )
                with contextlib.suppress(Exception):
                    fail(self.rt, item["id"], owner=owner, reason="error", message="internal error in the worker")


def ensure_background(rt: Runtime) -> None:
    """Start the sweeper and worker threads once per runtime (stopped by ``rt.close()``)."""
    if rt.job_threads is not None:
        return
    with rt.job_threads_lock:
        if rt.job_threads is not None:
            return
        bg = rt.job_threads = Background(rt)
        bg.start()
        rt.on_close(bg.close)
