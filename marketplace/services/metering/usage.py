"""Metering's bookkeeping on a locked contract row: counters, usage rows and their leaves.

For: what :mod:`marketplace.services.metering.reserve` does inside its transactions: resolving
the caller's contract, the policy counters of a contract row (:class:`contracts.policy.UsageState`),
finishing a reserved use as ``charged`` or ``released`` (its ``som.usage/v1`` ledger leaf, the
counters, the idempotency key's state) and releasing expired leases. Not for: deciding whether a
use is allowed (:func:`contracts.policy.decide`), the API of metering (``reserve``).

A usage row's states::

    reserved --commit----------------------> charged
    reserved --release / lease expired-----> released
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from contracts import policy, records
from contracts.offer import Status
from marketplace.db.base import utcnow
from marketplace.db.models_contracts import ContractRow, IdempotencyKey, UsageRow, UsageState
from marketplace.errors import Conflict, NotFound
from marketplace.runtime import Runtime
from marketplace.services.contracts import contract_of, ledger_append, lock_contract, terms_of
from marketplace.services.identity import Principal

__all__ = ["apply_state", "finish", "resolve_contract", "sweep", "sweep_expired", "usage_state"]


def usage_state(row: ContractRow, bound: frozenset[str]) -> policy.UsageState:
    return policy.UsageState(
        used_units=row.used_units,
        reserved_units=row.reserved_units,
        window_units=row.window_units,
        window_start=row.window_start,
        status=Status(row.status),
        bound_keysets=bound,
    )


def apply_state(row: ContractRow, st: policy.UsageState, now: datetime) -> None:
    row.used_units = st.used_units
    row.reserved_units = st.reserved_units
    row.window_units = st.window_units
    row.window_start = st.window_start
    row.updated_at = now


def _policy_res(u: UsageRow) -> policy.Reservation:
    return policy.Reservation(units=u.units, time=u.reserved_at, window_start=u.window_start)


def finish(
    s: Session, c: ContractRow, u: UsageRow, outcome: UsageState, now: datetime, *, reason: str | None = None
) -> None:
    """Charge or release ``u`` (state ``reserved``) on locked contract ``c``: counters, leaf, row."""
    st = usage_state(c, frozenset())
    # A released use gives its units back to the quota but not to the rate window: every attempt
    # that reserved (a failed, rejected, cancelled or expired job too) counts against the rate.
    st = (
        policy.commit(st, _policy_res(u))
        if outcome is UsageState.CHARGED
        else policy.release(st, _policy_res(u), keep_rate=True)
    )
    apply_state(c, st, now)
    rec = records.usage_record(
        contract_of(c),
        usage_id=u.id,
        mode=u.mode,
        units=u.units,
        outcome=outcome.value,  # the leaf holds exact strings
        request_digest=u.request_digest,
        idempotency_key_digest=u.idempotency_key_digest,
        time=u.reserved_at,
        terms=terms_of(c),
        version=c.version_number,  # the pinned model version the use computed with
    )
    u.ledger_index = ledger_append(s, rec)
    u.record = rec
    u.state = outcome
    u.finished_at = now
    if reason is not None:
        u.release_reason = reason[:200]
    s.execute(
        update(IdempotencyKey)
        .where(
            IdempotencyKey.org_id == u.consumer_org_id,
            IdempotencyKey.key_digest == u.idempotency_key_digest,
            IdempotencyKey.usage_id == u.id,
        )
        .values(state=outcome)
    )


def sweep(s: Session, c: ContractRow, now: datetime) -> int:
    if c.reserved_units <= 0:
        return 0
    expired = list(
        s.scalars(
            select(UsageRow)
            .where(
                UsageRow.contract_id == c.id,
                UsageRow.state == UsageState.RESERVED,
                UsageRow.lease_expires_at <= now,
            )
            .order_by(UsageRow.reserved_at, UsageRow.id)
        )
    )
    for u in expired:
        finish(s, c, u, UsageState.RELEASED, now, reason="lease expired")
    return len(expired)


def resolve_contract(s: Session, p: Principal, offering_id: str) -> ContractRow:
    """The caller's single live contract for ``offering_id``, locked (one query)."""
    stmt = select(ContractRow).where(
        ContractRow.consumer_org_id == p.org_id,
        ContractRow.offering_id == offering_id,
        ContractRow.status != Status.TERMINATED.value,
    )
    if s.get_bind().dialect.name != "sqlite":
        stmt = stmt.with_for_update()
    rows = list(s.scalars(stmt))
    if not rows:
        raise NotFound(
            f"no contract of your organisation for offering {offering_id}; accept an offer first "
            f"(`som contract accept`)"
        )
    if len(rows) > 1:
        active = [r for r in rows if r.status == Status.ACTIVE.value]
        if len(active) != 1:
            raise Conflict(
                f"your organisation has {len(rows)} contracts for offering {offering_id}; "
                f"choose one with the X-Som-Contract header"
            )
        rows = active
    return rows[0]


def sweep_expired(rt: Runtime, *, now: datetime | None = None) -> int:
    """Release every reservation whose lease has expired (all contracts); how many were released.
    :func:`begin` does this lazily per contract; a background reaper may call this."""
    t = now or utcnow()
    with rt.tx() as s:
        ids = sorted(
            set(
                s.scalars(
                    select(UsageRow.contract_id).where(
                        UsageRow.state == UsageState.RESERVED, UsageRow.lease_expires_at <= t
                    )
                )
            )
        )
    n = 0
    for cid in ids:
        with rt.tx() as s:
            c = lock_contract(s, cid)
            if c is not None:
                n += sweep(s, c, t)
    return n
