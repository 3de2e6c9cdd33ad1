"""Contract and metering tables: offers, contracts, contract events, usage records, idempotency keys.

For: persisting signed offers/contracts/events (their canonical dicts, verified before insert) and
the usage counters that :mod:`marketplace.services.metering` locks and updates.
Not for: ledger leaves (the ledger's tables) or key sets (the HE feature's tables).

The ``contracts`` row carries the contract's usage counters (used, reserved, rate window): it is
the row that metering locks (``SELECT ... FOR UPDATE`` on PostgreSQL, ``BEGIN IMMEDIATE`` on
SQLite), so every use of one contract is serialized and a quota is never overspent.
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import JSON, ForeignKey, Index, Integer, LargeBinary, String, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from contracts.offer import Status
from marketplace.db.base import Base, EnumText, UTCDateTime, new_id, utcnow

__all__ = ["ContractEventRow", "ContractRow", "IdempotencyKey", "OfferRow", "OfferState", "UsageRow", "UsageState"]


class OfferState(StrEnum):
    """An offer's state: ``open -> withdrawn`` (withdrawing closes it to new acceptances)."""

    OPEN = "open"
    WITHDRAWN = "withdrawn"


class UsageState(StrEnum):
    """A metered use (and its idempotency key)::

        reserved --commit-----------------> charged
        reserved --release / lease expired-> released

    (:mod:`marketplace.services.metering.usage` makes both transitions, in ``finish``)."""

    RESERVED = "reserved"
    CHARGED = "charged"
    RELEASED = "released"


class OfferRow(Base):
    """A provider's signed offer (``som.offer/v1``) for one of its offerings."""

    __tablename__ = "offers"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)  # the signed offer_id
    offering_id: Mapped[str] = mapped_column(ForeignKey("offerings.id"), index=True)
    provider_org_id: Mapped[str] = mapped_column(ForeignKey("orgs.id"), index=True)
    provider_key: Mapped[str] = mapped_column(String(80))
    digest: Mapped[str] = mapped_column(String(80), unique=True)
    record: Mapped[dict[str, Any]] = mapped_column(JSON)  # Offer.to_dict()
    status: Mapped[OfferState] = mapped_column(EnumText(OfferState), default=OfferState.OPEN)
    addressed_to: Mapped[list[str] | None] = mapped_column(JSON, nullable=True)  # private offer: org ids
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class ContractRow(Base):
    """An accepted contract, its current lifecycle state and its usage counters."""

    __tablename__ = "contracts"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)  # Contract.contract_id
    offer_id: Mapped[str] = mapped_column(ForeignKey("offers.id"), index=True)
    offering_id: Mapped[str] = mapped_column(ForeignKey("offerings.id"), index=True)
    provider_org_id: Mapped[str] = mapped_column(ForeignKey("orgs.id"), index=True)
    consumer_org_id: Mapped[str] = mapped_column(ForeignKey("orgs.id"), index=True)
    consumer_key: Mapped[str] = mapped_column(String(80))
    record: Mapped[dict[str, Any]] = mapped_column(JSON)  # Contract.to_dict()
    digest: Mapped[str] = mapped_column(String(80))
    terms: Mapped[dict[str, Any]] = mapped_column(JSON)  # terms in effect (after amendments)
    status: Mapped[Status] = mapped_column(EnumText(Status), default=Status.ACTIVE)
    seq: Mapped[int] = mapped_column(Integer, default=0)  # last event seq
    head: Mapped[str] = mapped_column(String(80))  # digest of the last event (or the contract)
    head_time: Mapped[datetime] = mapped_column(UTCDateTime())
    accepted_at: Mapped[datetime] = mapped_column(UTCDateTime())
    ledger_index: Mapped[int | None] = mapped_column(Integer, nullable=True)
    version_number: Mapped[int | None] = mapped_column(Integer, nullable=True)  # pinned at acceptance
    used_units: Mapped[int] = mapped_column(Integer, default=0)
    reserved_units: Mapped[int] = mapped_column(Integer, default=0)
    window_units: Mapped[int] = mapped_column(Integer, default=0)
    window_start: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)

    __table_args__ = (Index("ix_contracts_consumer_offering", "consumer_org_id", "offering_id"),)


class ContractEventRow(Base):
    """One signed contract event (``som.event/v1``), in chain order."""

    __tablename__ = "contract_events"

    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("cev"))
    contract_id: Mapped[str] = mapped_column(ForeignKey("contracts.id"), index=True)
    seq: Mapped[int] = mapped_column(Integer)
    kind: Mapped[str] = mapped_column(String(20))
    by: Mapped[str] = mapped_column(String(20))
    digest: Mapped[str] = mapped_column(String(80))
    record: Mapped[dict[str, Any]] = mapped_column(JSON)  # ContractEvent.to_dict()
    time: Mapped[datetime] = mapped_column(UTCDateTime())
    ledger_index: Mapped[int | None] = mapped_column(Integer, nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)

    __table_args__ = (UniqueConstraint("contract_id", "seq", name="uq_contract_events_seq"),)


class UsageRow(Base):
    """One metered use: reserved, then charged or released. ``record`` is its ledger leaf."""

    __tablename__ = "usage_records"

    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("use"))
    contract_id: Mapped[str] = mapped_column(ForeignKey("contracts.id"))
    offering_id: Mapped[str] = mapped_column(String(40))
    consumer_org_id: Mapped[str] = mapped_column(String(40), index=True)
    provider_org_id: Mapped[str] = mapped_column(String(40), index=True)
    mode: Mapped[str] = mapped_column(String(20))
    job_kind: Mapped[str | None] = mapped_column(String(20), nullable=True)
    keyset_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    units: Mapped[int] = mapped_column(Integer)
    state: Mapped[UsageState] = mapped_column(EnumText(UsageState), default=UsageState.RESERVED)
    idempotency_key_digest: Mapped[str] = mapped_column(String(80))
    request_digest: Mapped[str] = mapped_column(String(80))
    reserved_at: Mapped[datetime] = mapped_column(UTCDateTime())
    window_start: Mapped[datetime] = mapped_column(UTCDateTime())
    lease_expires_at: Mapped[datetime] = mapped_column(UTCDateTime())
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    release_reason: Mapped[str | None] = mapped_column(String(200), nullable=True)
    result_blob: Mapped[str | None] = mapped_column(String(80), nullable=True)
    result_inline: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True)  # small results
    result_media_type: Mapped[str | None] = mapped_column(String(100), nullable=True)
    ledger_index: Mapped[int | None] = mapped_column(Integer, nullable=True)
    record: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)

    __table_args__ = (
        Index("ix_usage_records_contract_state", "contract_id", "state"),
        Index("ix_usage_records_contract_time", "contract_id", "reserved_at"),
        Index("ix_usage_records_ledger_index", "ledger_index"),  # the monitoring roll-up's watermark
    )


class IdempotencyKey(Base):
    """Idempotency key of one organisation (stored as a digest) -> its current usage attempt."""

    __tablename__ = "idempotency_keys"

    org_id: Mapped[str] = mapped_column(String(40), primary_key=True)
    key_digest: Mapped[str] = mapped_column(String(80), primary_key=True)
    request_digest: Mapped[str] = mapped_column(String(80))
    usage_id: Mapped[str] = mapped_column(String(40))
    contract_id: Mapped[str] = mapped_column(String(64))
    state: Mapped[UsageState] = mapped_column(EnumText(UsageState))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
