"""Tables of federated training: federations, their participants and rounds.

For: the federation's recipe and participant terms, who joined (with its Flower node id), the
privacy budget spent, one row per completed round (participants, accuracy, epsilon, the ledger
leaves of the contributions). Not for: updates (the coordinator only ever holds masked shares,
in memory) or participants' data (it never leaves their machines).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, BigInteger, Float, ForeignKey, Integer, String, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from marketplace.db.base import Base, UTCDateTime, new_id, utcnow

__all__ = ["Federation", "FederationParticipant", "FederationRound"]


class Federation(Base):
    __tablename__ = "federations"

    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("fed"))
    offering_id: Mapped[str] = mapped_column(ForeignKey("offerings.id"), index=True)
    org_id: Mapped[str] = mapped_column(ForeignKey("orgs.id"), index=True)  # the provider
    parent_version_id: Mapped[str] = mapped_column(ForeignKey("offering_versions.id"))
    name: Mapped[str] = mapped_column(String(200), default="")
    recipe: Mapped[dict[str, Any]] = mapped_column(JSON)
    terms: Mapped[dict[str, Any]] = mapped_column(JSON)
    status: Mapped[str] = mapped_column(String(20), default="open")  # open|running|completed|failed|budget_exhausted
    rounds_done: Mapped[int] = mapped_column(Integer, default=0)
    epsilon_spent: Mapped[float] = mapped_column(Float, default=0.0)
    result_version_id: Mapped[str | None] = mapped_column(ForeignKey("offering_versions.id"), nullable=True)
    error: Mapped[str | None] = mapped_column(String(2000), nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class FederationParticipant(Base):
    __tablename__ = "federation_participants"
    __table_args__ = (UniqueConstraint("federation_id", "org_id", name="uq_federation_participants_org"),)

    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("fpt"))
    federation_id: Mapped[str] = mapped_column(ForeignKey("federations.id"), index=True)
    org_id: Mapped[str] = mapped_column(ForeignKey("orgs.id"), index=True)
    contract_id: Mapped[str] = mapped_column(ForeignKey("contracts.id"))
    node_id: Mapped[int] = mapped_column(BigInteger)  # Flower node id (random, 62 bits)
    samples: Mapped[int] = mapped_column(Integer, default=0)  # declared by the participant
    rounds: Mapped[int] = mapped_column(Integer, default=0)
    units: Mapped[int] = mapped_column(BigInteger, default=0)
    credit_minor: Mapped[int] = mapped_column(BigInteger, default=0)
    epsilon_spent: Mapped[float] = mapped_column(Float, default=0.0)
    joined_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class FederationRound(Base):
    __tablename__ = "federation_rounds"
    __table_args__ = (UniqueConstraint("federation_id", "number", name="uq_federation_rounds_number"),)

    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("frd"))
    federation_id: Mapped[str] = mapped_column(ForeignKey("federations.id"), index=True)
    number: Mapped[int] = mapped_column(Integer)
    participants: Mapped[list[str]] = mapped_column(JSON)  # org ids whose update was aggregated
    metrics: Mapped[dict[str, Any]] = mapped_column(JSON)
    epsilon: Mapped[float] = mapped_column(Float, default=0.0)  # cumulative after this round
    ledger_indexes: Mapped[list[int]] = mapped_column(JSON)
    completed_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
