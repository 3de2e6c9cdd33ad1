"""The one place that emits audit events.

Every access and permission change goes through :func:`emit`: keys created or revoked, roles
granted, offerings published or withdrawn, artifacts decrypted for a computation, failed
authorization. Events are append-only rows, and each also becomes a ledger leaf (a
``som.audit/v1`` record appended with :func:`marketplace.services.ledger.append`) in the same
transaction, whoever emits it (API, CLI on the server host, workers).

Denials are recorded with :func:`emit_detached`, in a transaction of their own, because the
request's own transaction is rolled back. Failed authentications (no principal at all) are not
recorded one by one: :func:`marketplace.services.auth_failures.note` counts them and emits one ``auth.failures`` summary
per client and window (:mod:`marketplace.services.auth_failures`).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Select, select
from sqlalchemy.orm import Session, sessionmaker

from contracts.records import audit_record
from marketplace.db.base import utcnow
from marketplace.db.models import AuditEvent
from marketplace.services.ledger.tree import append as ledger_append

__all__ = ["Actor", "emit", "emit_detached", "query"]


@dataclass(frozen=True)
class Actor:
    """Who acts, for which organisation, in which request."""

    actor: str
    org_id: str | None
    request_id: str = ""

    @classmethod
    def system(cls, request_id: str = "") -> Actor:
        return cls(actor="system", org_id=None, request_id=request_id)


def _fit(text: str, limit: int) -> str:
    """``text`` as a printable string of at most ``limit`` characters (targets and actors can come
    from the request: a path, an id someone tried, a key prefix). Non-printable characters are
    backslash-escaped, so the row, the ledger leaf (printable strings only) and every database
    (PostgreSQL refuses NUL) accept it, and the event still shows what was presented."""
    if text.isprintable() and len(text) <= limit:
        return text
    out = "".join(c if c.isprintable() else ascii(c)[1:-1] for c in text)
    return out if len(out) <= limit else out[: limit - 1] + "…"


def emit(
    session: Session,
    who: Actor,
    action: str,
    *,
    target: str = "",
    outcome: str = "success",
    detail: dict[str, Any] | None = None,
    now: datetime | None = None,
) -> AuditEvent:
    event = AuditEvent(
        time=now or utcnow(),
        actor=_fit(who.actor, 80),
        org_id=who.org_id,
        action=action,
        target=_fit(target, 200),
        outcome=outcome,
        request_id=who.request_id,
        detail=detail or {},
    )
    session.add(event)
    session.flush()
    ledger_append(
        session,
        audit_record(  # a som.audit/v1 leaf, in the emitting transaction
            event_id=event.id,
            actor=event.actor,
            org=event.org_id,
            action=event.action,
            target=event.target or None,
            outcome=event.outcome,
            request_id=event.request_id or None,
            time=event.time,
        ),
    )
    return event


def emit_detached(factory: sessionmaker[Session], who: Actor, action: str, **kw: Any) -> None:
    """Emit in a fresh transaction (for denials whose request transaction is rolled back)."""
    with factory() as session, session.begin():
        emit(session, who, action, **kw)


def _aware(t: datetime | None) -> datetime | None:
    return t.replace(tzinfo=UTC) if t is not None and t.tzinfo is None else t


def query(
    *,
    org_id: str | None = None,
    actor: str | None = None,
    action: str | None = None,
    outcome: str | None = None,
    target: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
) -> Select[AuditEvent]:
    stmt = select(AuditEvent)
    since = _aware(since)
    until = _aware(until)
    if org_id:
        stmt = stmt.where(AuditEvent.org_id == org_id)
    if actor:
        stmt = stmt.where(AuditEvent.actor == actor)
    if action:
        stmt = stmt.where(AuditEvent.action == action)
    if outcome:
        stmt = stmt.where(AuditEvent.outcome == outcome)
    if target:
        stmt = stmt.where(AuditEvent.target == target)
    if since:
        stmt = stmt.where(AuditEvent.time >= since)
    if until:
        stmt = stmt.where(AuditEvent.time < until)
    return stmt.order_by(AuditEvent.seq)
