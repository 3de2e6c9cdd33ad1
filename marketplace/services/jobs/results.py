"""What a compute site posts back: a sealed result (charged once) or a failure (units released).

For: :func:`complete` (store the result, commit the reservation, mark the job succeeded: in two
steps, so that a crash between them is finished by the sweeper, :func:`charge`), :func:`fail`
and :func:`check_sealed`. Every end goes through :func:`.states.finish`.
Not for: who may post (the caller's ``may_post`` check: :mod:`marketplace.services.dispatch`
for agents) or leasing (:mod:`.leasing`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from sqlalchemy import update
from sqlalchemy.orm import Session

from crypto.errors import DecryptionError
from crypto.sealing import SealKeyPair, open_sealed
from marketplace.db.base import utcnow
from marketplace.db.models_jobs import Job
from marketplace.errors import Conflict, Invalid, NotFound, PayloadTooLarge
from marketplace.runtime import Runtime
from marketplace.services import catalog, metering, monitoring
from marketplace.services.jobs.states import FINAL, JobStatus, finish, move, reservation_of

__all__ = ["MayPost", "charge", "check_sealed", "complete", "fail"]

MayPost = Callable[[Session, Job], None]
"""The poster's authority over a job, checked in the posting transaction (raises NotFound)."""
_PROBE = SealKeyPair.generate()


def check_sealed(blob: bytes, max_size: int) -> None:
    """Refuse what is not a well-framed sealed payload (413 if too large, 422 if malformed)."""
    if len(blob) > max_size:
        raise PayloadTooLarge(f"sealed payload of {len(blob)} bytes exceeds the limit of {max_size} bytes")
    try:  # framing errors are ValueError before any cryptography; a well-framed blob fails to open
        open_sealed(_PROBE, blob, info=b"som/probe", max_size=max_size)
    except ValueError as e:
        raise Invalid(f"not a sealed payload: {e}") from e
    except DecryptionError:
        return
    raise Invalid("not a sealed payload")  # pragma: no cover - sealed to a throwaway key


def _posted(s: Session, job_id: str, may_post: MayPost | None) -> Job:
    job = s.get(Job, job_id)
    if job is None:
        raise NotFound(f"job {job_id} not found")
    if may_post is not None:  # None: the marketplace's own worker
        may_post(s, job)
    return job


def complete(rt: Runtime, job_id: str, *, owner: str, result: bytes, may_post: MayPost | None = None) -> Job:
    """Store the sealed result and charge, once. A duplicate post (the job already succeeded)
    returns the job unchanged; a post for a cancelled/expired/failed job is a Conflict."""
    check_sealed(result, rt.settings.max_sealed_bytes)
    with rt.tx() as s:
        job = _posted(s, job_id, may_post)
        if job.status == JobStatus.SUCCEEDED or job.finishing:
            return job
        if job.status not in (JobStatus.RUNNING, JobStatus.QUEUED):
            raise Conflict(f"job {job_id} is {job.status}; the result is discarded")
        job.finishing = True
        job.updated_at = utcnow()
    return charge(rt, job_id, result=result)


def _observe(
    s: Session, job: Job, r: metering.Reservation | None, *, overhead_s: float, ok: bool, error_class: str | None = None
) -> None:
    """One finished job for monitoring: queue = reserved (queued) to started, model = started to
    finished (on the worker or agent), overhead = storing the result and charging."""
    ver = catalog.latest_version(s, job.offering_id)
    queued = r.time if r is not None else job.created_at
    started = job.started_at or queued
    end = job.finished_at or utcnow()
    monitoring.record_inference(
        job.offering_id,
        ver.number if ver else 0,
        "remote_job",
        queue_s=(started - queued).total_seconds(),
        model_s=(end - started).total_seconds(),
        overhead_s=overhead_s,
        ok=ok,
        error_class=error_class,
    )


def charge(rt: Runtime, job_id: str, *, result: bytes | None) -> Job:
    """Second half of :func:`complete` (also the sweeper's retry after a crash): commit, then mark."""
    t0 = time.perf_counter()
    with rt.tx() as s:
        job = s.get(Job, job_id)
        if job is None:  # pragma: no cover
            raise NotFound(f"job {job_id} not found")
        rdict, addr = job.reservation, job.result_blob
    if result is not None:
        addr = rt.blobs.put(result)
        with rt.tx() as s:
            s.execute(update(Job).where(Job.id == job_id).values(result_blob=addr, result_size=len(result)))
    elif not addr:  # crashed before the result was stored: the job runs again
        with rt.tx() as s:
            row = s.get(Job, job_id)
            if row is not None:
                row.finishing, row.lease_owner = False, None
                if row.status != JobStatus.QUEUED:
                    move(row, JobStatus.QUEUED)
        return job
    r = reservation_of(rdict)
    usage_id: str | None = None
    receipt: dict[str, Any] | None = None
    failed: str | None = None
    if r is not None:
        try:
            # A job's Idempotency-Key never replays (each job begins once), so the usage row keeps
            # no second copy of the sealed result: the job's own copy is purged when it expires.
            charged = metering.commit(rt, r, result=b"", media_type="application/octet-stream")
            usage_id, receipt = charged.usage_id, charged.receipt
        except Conflict as e:
            failed = f"the reservation was released before the result came ({e.message})"
        except NotFound as e:
            failed = e.message
    now = utcnow()
    with rt.tx() as s:
        job = s.get(Job, job_id)
        if job is None:  # pragma: no cover
            raise NotFound(f"job {job_id} not found")
        if failed is not None:
            done = finish(
                s,
                job,
                JobStatus.EXPIRED,
                now=now,
                event="job.expire",
                error=failed,
                reason="reservation_released",
                detail={"error": failed},
                outcome="failure",
            )
        else:
            done = finish(
                s,
                job,
                JobStatus.SUCCEEDED,
                now=now,
                event="job.succeed",
                usage_id=usage_id or (r.usage_id if r else None),
                receipt=receipt,
                result_ttl=rt.settings.job_result_ttl_seconds,
                detail={"usage_id": usage_id or (r.usage_id if r else None), "attempts": job.attempts},
            )
            _observe(s, job, r, overhead_s=time.perf_counter() - t0, ok=True)
    done.apply(rt)
    return job


def fail(rt: Runtime, job_id: str, *, owner: str, reason: str, message: str, may_post: MayPost | None = None) -> Job:
    """The compute site could not produce a result: the job fails and its units are released."""
    with rt.tx() as s:
        job = _posted(s, job_id, may_post)
        if job.status in FINAL or job.finishing:
            return job
        done = finish(
            s,
            job,
            JobStatus.FAILED,
            now=utcnow(),
            event="job.fail",
            error=message[:4000],
            reason=reason[:40],
            detail={"reason": reason[:40]},
            outcome="failure",
            release=f"job failed: {reason}"[:200],
        )
        _observe(s, job, reservation_of(job.reservation), overhead_s=0.0, ok=False, error_class=reason[:40])
    done.apply(rt)
    return job
