"""The one place that emits audit events.

Every access and permission change goes through :func:`emit`: keys created or revoked, roles
granted, offerings published or withdrawn, artifacts decrypted for a computation, failed
authorization. Events are append-only rows, and each also becomes a ledger leaf (see
:mod:`marketplace.services.ledger`) in the same transaction.

Denials are recorded with :func:`emit_detached`, in a transaction of their own, because the
request's own transaction is rolled back. Failed authentications (no principal at all) are not
recorded one by one: :func:`note_auth_failure` counts them and emits one ``auth.failures`` summary
per client and window (:mod:`marketplace.services.auth_failures`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Select, select
from sqlalchemy.orm import Session, sessionmaker

from marketplace.db.base import utcnow
from marketplace.db.models import AuditEvent

__all__ = ["Actor", "LeafSink", "emit", "emit_detached", "note_auth_failure", "query", "set_leaf_sink"]

# Called with (session, event) inside the emitting transaction. By default every audit event
# becomes a ledger leaf, whoever emits it (API, CLI on the server host, workers).
LeafSink = Callable[[Session, AuditEvent], None]


def _ledger_sink(session: Session, event: AuditEvent) -> None:
    from marketplace.services.ledger import audit_leaf_sink

    audit_leaf_sink(session, event)


_leaf_sink: LeafSink | None = _ledger_sink


def set_leaf_sink(sink: LeafSink | None) -> None:
    global _leaf_sink
    _leaf_sink = sink


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
    if _leaf_sink is not None:
        _leaf_sink(session, event)
    return event


def emit_detached(factory: sessionmaker[Session], who: Actor, action: str, **kw: Any) -> None:
    """Emit in a fresh transaction (for denials whose request transaction is rolled back)."""
    with factory() as session, session.begin():
        emit(session, who, action, **kw)


def note_auth_failure(
    rt: Any, *, source: str, prefix: str, path: str, method: str, reason: str, request_id: str = ""
) -> None:
    """Count a request that presented no valid key (``rt``: the Runtime). One ``auth.failures``
    event per client address and window summarises them (see
    :mod:`marketplace.services.auth_failures`); authenticated denials use :func:`emit_detached`."""
    from marketplace.services import auth_failures

    auth_failures.note(rt, source=source, prefix=prefix, path=path, method=method, reason=reason,
                       request_id=request_id)


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
