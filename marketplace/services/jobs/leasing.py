"""Jobs on the lease mechanism: handing queued jobs to compute sites and taking lost ones back.

For: the job side of :mod:`marketplace.services.leases`: which queued job a compute site may take
(:func:`lease_for_agent` for a provider's agent, :func:`lease_local` for this process's workers),
the work item it is handed, and reaping (:func:`reap_lost`: a running job whose lease ran out goes
back to the queue, or fails after ``max_attempts`` leases).
Not for: the lease columns and invariants (:mod:`marketplace.services.leases`) or what a compute
site posts back (:mod:`.results`).
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import ColumnElement
from sqlalchemy.orm import Session

from marketplace.db.models_jobs import Agent, Job
from marketplace.runtime import Runtime
from marketplace.services import audit, leases
from marketplace.services.jobs.states import KINDS, JobStatus, Settlement, finish, move

__all__ = ["keep", "lease_for_agent", "lease_local", "reap_lost"]


def _item(job: Job) -> dict[str, Any]:
    assert job.lease_expires_at is not None
    return {
        "type": "job",
        "id": job.id,
        "kind": job.kind,
        "offering_id": job.offering_id,
        "meta": {
            "units": job.units,
            "limits": job.limits,
            "code_digest": job.code_digest,
            "max_rows": job.units if job.kind != "custom" else None,
        },
        "lease_expires_at": job.lease_expires_at.isoformat(),
        "attempt": job.attempts,
    }


def _take(rt: Runtime, s: Session, owner: str, now: datetime, *where: ColumnElement[bool]) -> dict[str, Any] | None:
    job = leases.take(
        s, Job, owner, now, rt.settings.agent_lease_seconds, *where, move=lambda j, to: move(j, to, now=now)
    )
    if job is None:
        return None
    job.started_at = job.started_at or now
    return _item(job)


def lease_for_agent(rt: Runtime, s: Session, agent: Agent, now: datetime) -> dict[str, Any] | None:
    """In the caller's transaction: lease the oldest queued job the agent can run, or None."""
    reap_lost(s, now, hosting="provider", fail_lost=False)
    kinds = [k for k in agent.capabilities if k in KINDS]
    if not kinds:
        return None
    return _take(
        rt,
        s,
        agent.id,
        now,
        Job.hosting == "provider",
        Job.offering_id.in_(agent.offering_ids),
        Job.kind.in_(kinds),
        Job.seal_public == agent.seal_public,
        Job.deadline_at > now,
    )


def lease_local(rt: Runtime, s: Session, owner: str, now: datetime) -> dict[str, Any] | None:
    """In the caller's transaction: lease the oldest queued marketplace-hosted job, or None."""
    return _take(rt, s, owner, now, Job.hosting == "marketplace", Job.deadline_at > now)


def reap_lost(s: Session, now: datetime, *, hosting: str | None = None, fail_lost: bool = True) -> list[Settlement]:
    """In ``s``: lost leases go back to the queue or (``fail_lost``) fail. Returns what to settle
    after the commit (the failed jobs' units and sealed inputs)."""
    settled: list[Settlement] = []

    def give_up(job: Job) -> None:
        settled.append(
            finish(
                s,
                job,
                JobStatus.FAILED,
                now=now,
                event="job.lease.expire",
                reason="lost",
                error=f"the compute site stopped answering {job.attempts} times; giving up",
                detail={"now": JobStatus.FAILED.value},
                release="job expired or lost",
            )
        )

    where = [Job.finishing.is_(False)] + ([Job.hosting == hosting] if hosting else [])
    for job in leases.reap(
        s,
        Job,
        now,
        *where,
        max_attempts=lambda j: j.max_attempts,
        move=lambda j, to: move(j, to, now=now),
        give_up=give_up if fail_lost else None,
    ):
        if job.status == JobStatus.QUEUED:
            audit.emit(s, audit.Actor.system(), "job.lease.expire", target=job.id, detail={"now": job.status})
    return settled


def keep(rt: Runtime, s: Session, job_id: str, owner: str, now: datetime) -> bool:
    """In ``s``: extend ``owner``'s lease on the job; False if it no longer holds it."""
    until = now + timedelta(seconds=rt.settings.agent_lease_seconds)
    return not leases.extend(s, owner, [job_id], until)
