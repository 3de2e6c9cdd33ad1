"""Audit trail for compliance officers."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from fastapi import APIRouter

from marketplace.api.deps import Auth, Page, Rt
from marketplace.api.schemas import AuditPublic, PageOf
from marketplace.db.paging import page_scalars
from marketplace.services import audit

router = APIRouter(prefix="/v1/audit", tags=["audit"])


@router.get("", response_model=PageOf[AuditPublic], summary="List and filter audit events (compliance, admin)")
def list_audit(
    p: Auth,
    rt: Rt,
    page: Page,
    org_id: str | None = None,
    actor: str | None = None,
    action: str | None = None,
    outcome: Literal["success", "denied", "failure"] | None = None,
    target: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
) -> PageOf[AuditPublic]:
    p.require("compliance", "admin")
    stmt = audit.query(
        org_id=org_id, actor=actor, action=action, outcome=outcome, target=target, since=since, until=until
    )
    with rt.tx() as s:
        rows, total = page_scalars(s, stmt, page)
        return PageOf[AuditPublic].build([AuditPublic.model_validate(r) for r in rows], total, page)
