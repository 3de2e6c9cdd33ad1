"""What a party sees of jobs: one job's public form, access by id, and the paginated lists.

For: the read side of :mod:`marketplace.api.routes_jobs`. A job is visible to its consumer
organisation and to the offering's provider; to anyone else it does not exist (a 404 audited as
a denied access). Lists are paginated in SQL (``LIMIT``/``OFFSET`` and a ``COUNT``).
Not for: changing a job (:mod:`.lifecycle`, :mod:`.results`).
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from marketplace.db.models_jobs import Job
from marketplace.errors import NotFound
from marketplace.services.identity import Principal

__all__ = ["get_for", "list_for", "view"]


def view(job: Job, p: Principal | None = None) -> dict[str, Any]:
    """The public form of a job (no payloads; code only for the parties)."""
    return {
        "id": job.id,
        "offering_id": job.offering_id,
        "org_id": job.org_id,
        "kind": job.kind,
        "status": job.status,
        "hosting": job.hosting,
        "seal_public": job.seal_public,
        "seal_statement": job.seal_statement,
        "units": job.units,
        "limits": job.limits,
        "code": job.code,
        "code_digest": job.code_digest,
        "input_size": job.input_size or None,
        "input_digest": job.input_digest or None,
        "result_size": job.result_size if job.result_blob else None,
        "result_available": bool(job.result_blob) and job.status == "succeeded",
        "attempts": job.attempts,
        "error": job.error,
        "error_reason": job.error_reason,
        "contract_id": job.contract_id,
        "usage_id": job.usage_id,
        "charged": job.charged,
        "receipt": job.receipt,
        "created_at": job.created_at,
        "updated_at": job.updated_at,
        "started_at": job.started_at,
        "finished_at": job.finished_at,
        "deadline_at": job.deadline_at,
        "result_expires_at": job.result_expires_at,
    }


def get_for(s: Session, p: Principal, job_id: str) -> Job:
    """A job the caller may see: its consumer organisation, or the offering's provider.
    Anyone else gets a 404 that is audited as a denied access."""
    job = s.get(Job, job_id)
    if job is None:
        raise NotFound(f"job {job_id} not found", denied=job_id)  # audited as a foreign one is
    if p.org_id not in (job.org_id, job.provider_org_id):
        raise NotFound(f"job {job_id} not found", denied=job_id)
    return job


def own(s: Session, p: Principal, job_id: str) -> Job:
    """A job of the caller's own organisation (as its consumer); else a 404 audited as denied."""
    job = get_for(s, p, job_id)
    if job.org_id != p.org_id:
        raise NotFound(f"job {job_id} not found", denied=job_id)
    return job


def list_for(
    s: Session, p: Principal, *, role: str, status: str | None, offering_id: str | None, limit: int, offset: int
) -> tuple[list[Job], int]:
    """One page of the caller's jobs (``role=provider``: its offerings' jobs), newest first, and
    how many there are in all."""
    where = [Job.provider_org_id == p.org_id if role == "provider" else Job.org_id == p.org_id]
    if status:
        where.append(Job.status == status)
    if offering_id:
        where.append(Job.offering_id == offering_id)
    total = s.scalar(select(func.count()).select_from(Job).where(*where)) or 0
    rows = s.scalars(select(Job).where(*where).order_by(Job.created_at.desc(), Job.id).limit(limit).offset(offset))
    return list(rows), int(total)
