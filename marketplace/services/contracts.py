"""Contracts in the service: signed offers, acceptances and lifecycle events, stored and ledgered.

For: publishing a provider's signed offer, recording a consumer's signed acceptance (the contract),
recording signed suspension/resumption/termination/amendment events, reading contracts for their
two parties, and statements. Signatures are made by the parties' own Ed25519 keys, on their own
machines (SDK/CLI); this module only *verifies* them with :mod:`contracts.offer` and never holds
an organisation's signing key.
Not for: metering a use (:mod:`marketplace.services.metering`), policy logic
(:mod:`contracts.policy`), the ledger's internals (:mod:`marketplace.services.ledger`).

Every accepted contract and every event becomes a ledger leaf (``som.contract/v1``,
``som.contract-event/v1``) and an audit event, in the same transaction as the row.
"""

from __future__ import annotations

import importlib
import importlib.util
import re
import threading
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import or_, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from contracts import metering as cmetering
from contracts import records
from contracts.errors import ChainError, SchemaError
from contracts.offer import (
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
from contracts.terms import Terms
from crypto.canonical import canonicalize
from crypto.errors import InvalidSignature, KeyMaterialError
from crypto.signing import verify
from marketplace.db.base import utcnow
from marketplace.db.models import Offering
from marketplace.db.models_contracts import ContractEventRow, ContractRow, OfferRow, UsageRow
from marketplace.errors import Conflict, Forbidden, Invalid, NotFound
from marketplace.services import audit, sharing, validation
from marketplace.services.identity import Principal

__all__ = [
    "CLOCK_SKEW",
    "OFFER_ID_RE",
    "accept_offer",
    "add_event",
    "contract_of",
    "get_for_party",
    "get_offer",
    "ledger_append",
    "ledger_receipt",
    "list_for_party",
    "list_offers",
    "lock_contract",
    "publish_offer",
    "statement",
    "terms_of",
    "withdraw_offer",
]

#: How far a signed record's own time may be from the server's clock.
CLOCK_SKEW = timedelta(minutes=10)
OFFER_ID_RE = re.compile(r"ofr_[A-Za-z0-9_-]{8,60}")

# -- the ledger (integration point; the ledger service is another feature) ------------------


def _ledger() -> Any:
    if importlib.util.find_spec("marketplace.services.ledger") is None:  # pragma: no cover
        return None
    return importlib.import_module("marketplace.services.ledger")


def ledger_append(session: Session, record: dict[str, Any]) -> int | None:
    """Append ``record`` as a ledger leaf in ``session``'s transaction; its index.

    ``None`` only while the ledger service is not installed (development of this feature)."""
    mod = _ledger()
    if mod is None:  # pragma: no cover
        return None
    return int(mod.append(session, record).index)


def ledger_receipt(rt: Any, index: int | None) -> dict[str, Any]:
    """The ledger's receipt (leaf, inclusion proof, checkpoint) for ``index``; call after commit."""
    mod = _ledger()
    if mod is None or index is None:  # pragma: no cover
        return {}
    return dict(mod.receipt(rt, index))


# -- parsed-record caches (records are immutable once stored) --------------------------------

_cache_lock = threading.Lock()
_contracts: dict[str, Contract] = {}
_terms: dict[tuple[str, int], Terms] = {}
_CACHE_MAX = 4096


def contract_of(row: ContractRow) -> Contract:
    """The signed :class:`Contract` of ``row`` (parsed once per process)."""
    c = _contracts.get(row.id)
    if c is None:
        c = Contract.from_dict(row.record)
        with _cache_lock:
            if len(_contracts) >= _CACHE_MAX:
                _contracts.clear()
            _contracts[row.id] = c
    return c


def terms_of(row: ContractRow) -> Terms:
    """The terms in effect for ``row`` (after amendments), parsed once per (contract, seq)."""
    key = (row.id, row.seq)
    t = _terms.get(key)
    if t is None:
        t = Terms.from_dict(row.terms)
        with _cache_lock:
            if len(_terms) >= _CACHE_MAX:
                _terms.clear()
            _terms[key] = t
    return t


def lock_contract(s: Session, contract_id: str) -> ContractRow | None:
    """Load a contract row and lock it until the end of the transaction.

    PostgreSQL: ``SELECT ... FOR UPDATE``. SQLite: the transaction is ``BEGIN IMMEDIATE`` already
    (one writer at a time), so a plain read is enough.
    """
    stmt = select(ContractRow).where(ContractRow.id == contract_id)
    bind = s.get_bind()
    if bind.dialect.name != "sqlite":
        stmt = stmt.with_for_update()
    return s.scalars(stmt).one_or_none()


def _check_time(name: str, t: datetime, now: datetime) -> None:
    if abs(t - now) > CLOCK_SKEW:
        raise Invalid(
            f"{name} {t.isoformat()} is more than {int(CLOCK_SKEW.total_seconds())} s from the "
            f"server's clock {now.isoformat()}; check your clock and sign again"
        )


# -- offers -----------------------------------------------------------------------------------


def publish_offer(
    s: Session,
    p: Principal,
    offering_id: str,
    signed: Any,
    who: audit.Actor,
    *,
    now: datetime | None = None,
    addressed_to: list[str] | None = None,
) -> OfferRow:
    """Store a provider-signed offer (``Offer.to_dict()``) for an offering the caller owns;
    ``addressed_to`` (organisation ids) makes it a private offer only they see and accept."""
    p.require("provider")
    t = now or utcnow()
    off = sharing.check(s, p, offering_id, sharing.Permission.ADMIN)
    if off.org_id != p.org_id:
        raise NotFound(f"offering {offering_id} not found", denied=offering_id)
    addressed_to = sharing.check_addressees(s, addressed_to)
    try:
        offer = Offer.from_dict(signed)
    except (SchemaError, ValueError, TypeError) as e:
        raise Invalid(f"offer: {e}") from e
    if offer.offering_id != offering_id:
        raise Invalid(f"offer.offering_id: expected {offering_id}, got {offer.offering_id}")
    if offer.provider_org != p.org_id:
        raise Invalid(f"offer.provider_org: expected your organisation {p.org_id}, got {offer.provider_org}")
    if not OFFER_ID_RE.fullmatch(offer.offer_id):
        raise Invalid(f"offer.offer_id: expected 'ofr_' + 8..60 URL-safe characters, got {offer.offer_id!r}")
    _check_time("offer.created", offer.created, t)
    if t >= offer.terms.valid_until:
        raise Invalid(f"offer.terms.valid_until {offer.terms.valid_until.isoformat()} is in the past")
    try:  # Ed25519 over the RFC 8785 body, as contracts.offer signs it
        verify(offer.provider_key, offer.signature, canonicalize(offer.body()))
    except (InvalidSignature, KeyMaterialError) as e:
        raise Invalid("offer signature did not verify") from e
    if s.get(OfferRow, offer.offer_id) is not None:
        raise Conflict(f"offer {offer.offer_id} already exists")
    row = OfferRow(
        id=offer.offer_id,
        offering_id=offering_id,
        provider_org_id=p.org_id,
        provider_key=offer.provider_key,
        digest=offer.digest(),
        record=offer.to_dict(),
        addressed_to=addressed_to,
        status="open",
        created_at=t,
    )
    s.add(row)
    s.flush()
    audit.emit(
        s, who, "offer.publish", target=row.id,
        detail={"offering_id": offering_id, "digest": row.digest, "provider_key": row.provider_key},
    )
    return row


def get_offer(s: Session, p: Principal, offer_id: str) -> OfferRow:
    """An offer the caller may see: its own organisation's, or an open offer of a published offering."""
    row = s.get(OfferRow, offer_id)
    if row is None:
        raise NotFound(f"offer {offer_id} not found", denied=offer_id)  # audited as a hidden one is
    if row.provider_org_id == p.org_id or p.has("admin"):
        return row
    off = s.get(Offering, row.offering_id)
    if row.status != "open" or off is None or off.status != "published" or not sharing.may(s, p, off):
        raise NotFound(f"offer {offer_id} not found", denied=offer_id)
    if row.addressed_to is not None and p.org_id not in row.addressed_to:  # a private offer to others
        raise NotFound(f"offer {offer_id} not found", denied=offer_id)
    return row


def list_offers(s: Session, p: Principal, offering_id: str) -> list[OfferRow]:
    """Offers of an offering visible to the caller (open ones; all of them for the owner)."""
    off = s.get(Offering, offering_id)
    if off is None:
        raise NotFound(f"offering {offering_id} not found", denied=offering_id)
    stmt = select(OfferRow).where(OfferRow.offering_id == offering_id)
    if off.org_id != p.org_id and not p.has("admin"):
        if off.status != "published" or not sharing.may(s, p, off):
            raise NotFound(f"offering {offering_id} not found", denied=offering_id)
        stmt = stmt.where(OfferRow.status == "open")
        rows = list(s.scalars(stmt.order_by(OfferRow.created_at, OfferRow.id)))
        return [r for r in rows if r.addressed_to is None or p.org_id in r.addressed_to]
    return list(s.scalars(stmt.order_by(OfferRow.created_at, OfferRow.id)))


def withdraw_offer(s: Session, p: Principal, offer_id: str, who: audit.Actor) -> OfferRow:
    """Close an offer to new acceptances (existing contracts are unaffected)."""
    p.require("provider")
    row = s.get(OfferRow, offer_id)
    if row is None or row.provider_org_id != p.org_id:
        raise NotFound(f"offer {offer_id} not found", denied=offer_id)
    if row.status != "withdrawn":
        row.status = "withdrawn"
        audit.emit(s, who, "offer.withdraw", target=row.id, detail={"offering_id": row.offering_id})
    return row


# -- contracts --------------------------------------------------------------------------------


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
    if orow.status != "open":
        raise Conflict(f"offer {offer_id} is {orow.status}; ask the provider for an open offer")
    if orow.provider_org_id == p.org_id:
        raise Forbidden("an organisation cannot accept its own offer")
    try:
        from contracts.offer import Acceptance

        acc = Acceptance.from_dict(signed_acceptance)
    except (SchemaError, ValueError, TypeError) as e:
        raise Invalid(f"acceptance: {e}") from e
    if acc.consumer_org != p.org_id:
        raise Invalid(f"acceptance.consumer_org: expected your organisation {p.org_id}, got {acc.consumer_org}")
    offer = Offer.from_dict(orow.record)
    if acc.offer_digest != offer.digest():
        raise Invalid(f"acceptance.offer_digest: expected {offer.digest()} (offer {offer_id}), got {acc.offer_digest}")
    _check_time("acceptance.accepted_at", acc.accepted_at, t)
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
        status=Status.ACTIVE.value,
        seq=0,
        head=contract.digest(),
        head_time=acc.accepted_at,
        accepted_at=acc.accepted_at,
        used_units=0,
        reserved_units=0,
        window_units=0,
        created_at=t,
        updated_at=t,
        version_number=validation.version_to_pin(s, orow.offering_id),  # what it computes with, for good
    )
    s.add(row)
    try:
        s.flush()
    except IntegrityError as e:  # a concurrent identical acceptance
        raise Conflict(f"contract {cid} already exists") from e
    row.ledger_index = ledger_append(s, records.contract_record(contract, time=t))
    audit.emit(
        s, who, "contract.accept", target=cid,
        detail={"offer_id": offer_id, "offering_id": row.offering_id,
                "provider_org": row.provider_org_id, "ledger_index": row.ledger_index},
    )
    return row


def get_for_party(s: Session, p: Principal, contract_id: str) -> ContractRow:
    """A contract the caller's organisation is a party to (others: 404)."""
    row = s.get(ContractRow, contract_id)
    if row is None or p.org_id not in (row.provider_org_id, row.consumer_org_id):
        raise NotFound(f"contract {contract_id} not found", denied=contract_id)
    return row


def list_for_party(
    s: Session,
    p: Principal,
    *,
    role: str | None = None,
    offering_id: str | None = None,
    status: str | None = None,
) -> list[ContractRow]:
    """Contracts of the caller's organisation, as provider, consumer or either."""
    if role == "provider":
        cond: Any = ContractRow.provider_org_id == p.org_id
    elif role == "consumer":
        cond = ContractRow.consumer_org_id == p.org_id
    else:
        cond = or_(ContractRow.provider_org_id == p.org_id, ContractRow.consumer_org_id == p.org_id)
    stmt = select(ContractRow).where(cond)
    if offering_id:
        stmt = stmt.where(ContractRow.offering_id == offering_id)
    if status:
        stmt = stmt.where(ContractRow.status == status)
    return list(s.scalars(stmt.order_by(ContractRow.created_at, ContractRow.id)))


def events_of(s: Session, contract_id: str) -> list[ContractEventRow]:
    return list(
        s.scalars(
            select(ContractEventRow)
            .where(ContractEventRow.contract_id == contract_id)
            .order_by(ContractEventRow.seq)
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
    _check_time("event.time", ev.time, t)
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
        contract_id=contract_id, seq=ev.seq, kind=ev.kind.value, by=ev.by.value,
        digest=ev.digest(), record=ev.to_dict(), time=ev.time, created_at=t,
    )
    s.add(erow)
    row.status = new.status.value
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
        s, who, _ACTIONS[ev.kind], target=contract_id,
        detail={"seq": ev.seq, "by": ev.by.value, "reason": ev.reason[:200],
                "status": row.status, "ledger_index": erow.ledger_index},
    )
    return erow


# -- statements -------------------------------------------------------------------------------


def usage_leaves(s: Session, contract_id: str, start: datetime, end: datetime) -> list[dict[str, Any]]:
    """The ``som.usage/v1`` leaves of a contract's finished uses reserved in ``[start, end)``."""
    rows = s.scalars(
        select(UsageRow.record)
        .where(
            UsageRow.contract_id == contract_id,
            UsageRow.state.in_(("charged", "released")),
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
