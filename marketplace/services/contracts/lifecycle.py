"""Contracts in the service: signed acceptances and lifecycle events, stored and ledgered.

For: recording a consumer's signed acceptance of an open offer (the contract), recording signed
suspension/resumption/termination/amendment events that follow the contract's chain
(:func:`contracts.offer.advance`), reading contracts for their two parties, and statements.
Signatures are made by the parties' own Ed25519 keys, on their own machines (SDK/CLI); this
module only *verifies* them with :mod:`contracts.offer` and never holds an organisation's
signing key. Every accepted contract and every event becomes a ledger leaf (``som.contract/v1``,
``som.contract-event/v1``) and an audit event, in the same transaction as the row.
Not for: offers (:mod:`~marketplace.services.contracts.offers`), metering a use
(:mod:`marketplace.services.metering`), policy logic (:mod:`contracts.policy`).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import ColumnElement, Select, or_, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from contracts import metering as cmetering
from contracts import records
from contracts.errors import ChainError, SchemaError
from contracts.offer import (
    Acceptance,
    ChainState,
    Contract,
    ContractEvent,
    Digest,
    EventKind,
    Offer,
    Party,
    Status,
    advance,
    verify_contract,
)
from crypto.errors import InvalidSignature
from marketplace.db.base import utcnow
from marketplace.db.models_contracts import (
    ContractEventRow,
    ContractRow,
    OfferState,
    UsageRow,
    UsageState,
)
from marketplace.errors import Conflict, Forbidden, Invalid, NotFound
from marketplace.services import audit, validation
from marketplace.services.contracts.offers import get_offer
from marketplace.services.contracts.store import (
    check_time,
    contract_of,
    ledger_append,
    lock_contract,
    terms_of,
)
from marketplace.services.identity import Principal

__all__ = [
    "accept_offer",
    "add_event",
    "events_of",
    "get_for_party",
    "party_query",
    "statement",
    "usage_leaves",
]


def accept_offer(
    s: Session,
    p: Principal,
    offer_id: str,
    signed_acceptance: Any,
    who: audit.Actor,
    *,
    now: datetime | None = None,
) -> ContractRow:
    """Record a consumer-signed acceptance of an open offer: the contract, ledgered and audited."""
    p.require("consumer")
    t = now or utcnow()
    orow = get_offer(s, p, offer_id)
    if orow.status != OfferState.OPEN:
        raise Conflict(f"offer {offer_id} is {orow.status}; ask the provider for an open offer")
    if orow.provider_org_id == p.org_id:
        raise Forbidden("an organisation cannot accept its own offer")
    try:
        acc = Acceptance.from_dict(signed_acceptance)
    except (SchemaError, ValueError, TypeError) as e:
        raise Invalid(f"acceptance: {e}") from e
    if acc.consumer_org != p.org_id:
        raise Invalid(f"acceptance.consumer_org: expected your organisation {p.org_id}, got {acc.consumer_org}")
    offer = Offer.from_dict(orow.record)
    if acc.offer_digest != offer.digest():
        raise Invalid(f"acceptance.offer_digest: expected {offer.digest()} (offer {offer_id}), got {acc.offer_digest}")
    check_time("acceptance.accepted_at", acc.accepted_at, t)
    contract = Contract(offer=offer, acceptance=acc)
    try:
        verify_contract(contract, provider_key=orow.provider_key)
    except InvalidSignature as e:
        raise Invalid("acceptance signature did not verify") from e
    if t >= offer.terms.valid_until:
        raise Conflict(f"offer {offer_id} expired at {offer.terms.valid_until.isoformat()}")
    cid = contract.contract_id
    if s.get(ContractRow, cid) is not None:
        raise Conflict(f"contract {cid} already exists (this acceptance was recorded before)")
    row = ContractRow(
        id=cid,
        offer_id=offer_id,
        offering_id=orow.offering_id,
        provider_org_id=orow.provider_org_id,
        consumer_org_id=p.org_id,
        consumer_key=acc.consumer_key,
        record=contract.to_dict(),
        digest=contract.digest(),
        terms=offer.terms.to_dict(),
        status=Status.ACTIVE,
        seq=0,
        head=contract.digest(),
        head_time=acc.accepted_at,
        accepted_at=acc.accepted_at,
        version_number=validation.version_to_pin(s, orow.offering_id),  # what it computes with, for good
        used_units=0,
        reserved_units=0,
        window_units=0,
        created_at=t,
        updated_at=t,
    )
    s.add(row)
    try:
        s.flush()
    except IntegrityError as e:  # a concurrent identical acceptance
        raise Conflict(f"contract {cid} already exists") from e
    row.ledger_index = ledger_append(s, records.contract_record(contract, time=t))
    audit.emit(
        s,
        who,
        "contract.accept",
        target=cid,
        detail={
            "offer_id": offer_id,
            "offering_id": row.offering_id,
            "provider_org": row.provider_org_id,
            "ledger_index": row.ledger_index,
        },
    )
    return row


def get_for_party(s: Session, p: Principal, contract_id: str) -> ContractRow:
    """A contract the caller's organisation is a party to (others: 404)."""
    row = s.get(ContractRow, contract_id)
    if row is None or p.org_id not in (row.provider_org_id, row.consumer_org_id):
        raise NotFound(f"contract {contract_id} not found", denied=contract_id)
    return row


def party_query(
    p: Principal,
    *,
    role: str | None = None,
    offering_id: str | None = None,
    status: str | None = None,
) -> Select[ContractRow]:
    """Contracts of the caller's organisation, as provider, consumer or either, oldest first
    (the one query scope of who may list which contract)."""
    if role == "provider":
        cond: ColumnElement[bool] = ContractRow.provider_org_id == p.org_id
    elif role == "consumer":
        cond = ContractRow.consumer_org_id == p.org_id
    else:
        cond = or_(ContractRow.provider_org_id == p.org_id, ContractRow.consumer_org_id == p.org_id)
    stmt = select(ContractRow).where(cond)
    if offering_id:
        stmt = stmt.where(ContractRow.offering_id == offering_id)
    if status:
        stmt = stmt.where(ContractRow.status == status)
    return stmt.order_by(ContractRow.created_at, ContractRow.id)


def events_of(s: Session, contract_id: str) -> list[ContractEventRow]:
    return list(
        s.scalars(
            select(ContractEventRow).where(ContractEventRow.contract_id == contract_id).order_by(ContractEventRow.seq)
        )
    )


_ACTIONS = {
    EventKind.SUSPENSION: "contract.suspend",
    EventKind.RESUMPTION: "contract.resume",
    EventKind.TERMINATION: "contract.terminate",
    EventKind.AMENDMENT: "contract.amend",
}


def add_event(
    s: Session,
    p: Principal,
    contract_id: str,
    signed_event: Any,
    who: audit.Actor,
    *,
    now: datetime | None = None,
) -> ContractEventRow:
    """Record a signed event that follows the contract's chain (verified with the parties' keys
    from the contract itself). The caller's organisation must be the party in ``event.by``."""
    t = now or utcnow()
    if get_for_party(s, p, contract_id) is None:  # pragma: no cover
        raise NotFound(f"contract {contract_id} not found")
    row = lock_contract(s, contract_id)
    if row is None:  # pragma: no cover - checked above
        raise NotFound(f"contract {contract_id} not found")
    try:
        ev = ContractEvent.from_dict(signed_event)
    except (SchemaError, ValueError, TypeError) as e:
        raise Invalid(f"event: {e}") from e
    party_org = row.provider_org_id if ev.by is Party.PROVIDER else row.consumer_org_id
    if party_org != p.org_id:
        raise Forbidden(f"only the {ev.by.value} may make this event")
    if ev.kind in (EventKind.SUSPENSION, EventKind.RESUMPTION):
        p.require("provider")
    check_time("event.time", ev.time, t)
    contract = contract_of(row)
    state = ChainState(Status(row.status), terms_of(row), row.seq, Digest(row.head), row.head_time)
    try:
        new = advance(contract, state, ev)
    except InvalidSignature as e:
        raise Invalid("event signature did not verify") from e
    except ChainError as e:
        if ev.seq != row.seq + 1 or ev.prev_digest != row.head:
            raise Conflict(f"{e}; fetch the contract again and sign an event that follows its head") from e
        raise Conflict(str(e)) from e
    erow = ContractEventRow(
        contract_id=contract_id,
        seq=ev.seq,
        kind=ev.kind.value,
        by=ev.by.value,
        digest=ev.digest(),
        record=ev.to_dict(),
        time=ev.time,
        created_at=t,
    )
    s.add(erow)
    row.status = new.status
    row.seq = new.seq
    row.head = new.head
    row.head_time = new.time
    row.terms = new.terms.to_dict()
    row.updated_at = t
    try:
        s.flush()
    except IntegrityError as e:  # a concurrent event with the same seq
        raise Conflict("another event was recorded first; fetch the contract and sign again") from e
    erow.ledger_index = ledger_append(s, records.contract_event_record(ev, time=t))
    audit.emit(
        s,
        who,
        _ACTIONS[ev.kind],
        target=contract_id,
        detail={
            "seq": ev.seq,
            "by": ev.by.value,
            "reason": ev.reason[:200],
            "status": row.status,
            "ledger_index": erow.ledger_index,
        },
    )
    return erow


# -- statements -------------------------------------------------------------------------------


def usage_leaves(s: Session, contract_id: str, start: datetime, end: datetime) -> list[dict[str, Any]]:
    """The ``som.usage/v1`` leaves of a contract's finished uses reserved in ``[start, end)``."""
    rows = s.scalars(
        select(UsageRow.record)
        .where(
            UsageRow.contract_id == contract_id,
            UsageRow.state.in_((UsageState.CHARGED, UsageState.RELEASED)),
            UsageRow.reserved_at >= start,
            UsageRow.reserved_at < end,
        )
        .order_by(UsageRow.reserved_at, UsageRow.id)
    )
    return [dict(r) for r in rows if r is not None]


def statement(s: Session, row: ContractRow, start: datetime, end: datetime) -> cmetering.Statement:
    """The statement of ``row`` over ``[start, end)`` from its usage leaves (the ledger's bytes)."""
    if not start <= end:
        raise Invalid(f"period: expected from <= to, got {start.isoformat()} > {end.isoformat()}")
    return cmetering.statement(contract_of(row), usage_leaves(s, row.id, start, end), start, end)
