"""The audit events about one offering, for its owner (docs/sharing.md, "Audit").

For: ``GET /v1/offerings/{id}/audit``: who created, edited, granted, retrieved (decrypted an
artifact), computed on (keysets, jobs, contracts, offers) or was refused (``authz.denied``) on
an offering. The caller needs ``admin`` permission on it (the owner's root keys or an admin team).
Not for: the organisation-wide trail (compliance, ``/v1/audit``).
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import Select, func, or_, select
from sqlalchemy.orm import Session

from marketplace.db.models import Artifact, AuditEvent, OfferingVersion
from marketplace.db.models_contracts import ContractRow, OfferRow
from marketplace.db.models_he import Keyset
from marketplace.db.models_jobs import Job
from marketplace.services import sharing
from marketplace.services.identity import Principal

__all__ = ["events"]


def _query(offering_id: str, action: str | None) -> Select[Any]:
    targets = [
        select(OfferRow.id).where(OfferRow.offering_id == offering_id),
        select(ContractRow.id).where(ContractRow.offering_id == offering_id),
        select(Keyset.id).where(Keyset.offering_id == offering_id),
        select(Job.id).where(Job.offering_id == offering_id),
        select(Artifact.id)
        .join(OfferingVersion, Artifact.version_id == OfferingVersion.id)
        .where(OfferingVersion.offering_id == offering_id),
    ]
    stmt = select(AuditEvent).where(
        or_(
            AuditEvent.target == offering_id,
            AuditEvent.target.like(f"{offering_id}/%"),
            *(AuditEvent.target.in_(t) for t in targets),
        )
    )
    if action:
        stmt = stmt.where(AuditEvent.action == action)
    return stmt


def events(
    s: Session, p: Principal, offering_id: str, *, action: str | None, limit: int, offset: int
) -> tuple[list[AuditEvent], int]:
    """The events about ``offering_id`` (oldest first) and their total; 404 unless admin on it."""
    sharing.check(s, p, offering_id, sharing.Permission.ADMIN)
    stmt = _query(offering_id, action)
    total = s.scalar(select(func.count()).select_from(stmt.subquery())) or 0
    rows = list(s.scalars(stmt.order_by(AuditEvent.seq).limit(limit).offset(offset)))
    return rows, total
