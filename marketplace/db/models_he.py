"""HE service tables: consumers' key sets, and public plans of provider-hosted offerings.

A key set is a consumer's *public* CKKS context (public, relinearisation and possibly Galois
keys; never the secret key), uploaded once per contract and plan. Its bytes live in the blob
store; this row says whose it is, which contract and plan it is bound to, and whether it is
revoked (deleted by its owner, or its contract ended).

Not for: ciphertexts (never stored, except as opaque replay results by metering) or weights.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, BigInteger, ForeignKey, Index, String
from sqlalchemy.orm import Mapped, mapped_column

from marketplace.db.base import Base, UTCDateTime, new_id, utcnow

__all__ = ["HEAgentPlan", "Keyset"]


class Keyset(Base):
    __tablename__ = "he_keysets"

    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("ks"))
    org_id: Mapped[str] = mapped_column(ForeignKey("orgs.id"), index=True)
    offering_id: Mapped[str] = mapped_column(ForeignKey("offerings.id"), index=True)
    contract_id: Mapped[str] = mapped_column(String(64), index=True)
    plan_digest: Mapped[str] = mapped_column(String(80))  # sha256:<hex> of the PublicPlan
    blob: Mapped[str] = mapped_column(String(80))  # blob-store address of the public context
    size: Mapped[int] = mapped_column(BigInteger)
    layouts: Mapped[list[str]] = mapped_column(JSON)  # layouts this key set can serve
    created_by: Mapped[str] = mapped_column(String(40))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    revoked_reason: Mapped[str | None] = mapped_column(String(60), nullable=True)

    __table_args__ = (Index("ix_he_keysets_org_contract", "org_id", "contract_id"),)


class HEAgentPlan(Base):
    """The public plan a provider-hosted offering's agent compiled locally (weights stay there)."""

    __tablename__ = "he_agent_plans"

    offering_id: Mapped[str] = mapped_column(ForeignKey("offerings.id"), primary_key=True)
    plan: Mapped[dict[str, Any]] = mapped_column(JSON)
    report: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    digest: Mapped[str] = mapped_column(String(80))
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
