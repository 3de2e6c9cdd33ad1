"""Foundation tables: organisations, API keys, offerings and versions, artifacts, audit events.

Other features add their own model modules on the same :class:`Base` (ledger, contracts,
metering, key sets, jobs, agents) and their own Alembic revision.
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import JSON, BigInteger, ForeignKey, Index, Integer, LargeBinary, String, Text
from sqlalchemy.orm import Mapped, mapped_column, relationship

from marketplace.db.base import Base, EnumText, UTCDateTime, new_id, utcnow

__all__ = [
    "ApiKey",
    "Artifact",
    "AuditEvent",
    "Hosting",
    "KeyKind",
    "Offering",
    "OfferingStatus",
    "OfferingVersion",
    "Org",
]


class Hosting(StrEnum):
    """Where an offering's weights are and its computations run."""

    MARKETPLACE = "marketplace"  #: uploaded (envelope-encrypted); computed by the marketplace
    PROVIDER = "provider"  #: never uploaded; computed by the provider's agent


class OfferingStatus(StrEnum):
    """An offering's catalog state: ``draft -> published <-> withdrawn``
    (:func:`marketplace.services.catalog.set_status`)."""

    DRAFT = "draft"
    PUBLISHED = "published"
    WITHDRAWN = "withdrawn"


class KeyKind(StrEnum):
    """An API key's kind: a person's or service's key, or a provider agent's (``/v1/agent/*`` only)."""

    USER = "user"
    AGENT = "agent"


class Org(Base):
    __tablename__ = "orgs"

    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("org"))
    name: Mapped[str] = mapped_column(String(200), unique=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class ApiKey(Base):
    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("key"))
    org_id: Mapped[str] = mapped_column(ForeignKey("orgs.id"), index=True)
    prefix: Mapped[str] = mapped_column(String(32), unique=True)
    hash: Mapped[str] = mapped_column(String(200))
    roles: Mapped[list[str]] = mapped_column(JSON)
    name: Mapped[str] = mapped_column(String(200), default="")
    kind: Mapped[KeyKind] = mapped_column(EnumText(KeyKind), default=KeyKind.USER)
    offering_ids: Mapped[list[str] | None] = mapped_column(JSON, nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime())
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    # The key that created this one (its parent; None for the bootstrap admin). Revoking a key
    # revokes its descendants (marketplace.services.identity.revoke_key).
    created_by: Mapped[str | None] = mapped_column(ForeignKey("api_keys.id"), nullable=True, index=True)
    # a personal key of a user signed in with SSO (docs/sso.md): it lives only while the user holds its roles
    user_id: Mapped[str | None] = mapped_column(ForeignKey("users.id"), nullable=True, index=True)

    org: Mapped[Org] = relationship()


class Offering(Base):
    __tablename__ = "offerings"

    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("off"))
    org_id: Mapped[str] = mapped_column(ForeignKey("orgs.id"), index=True)
    name: Mapped[str] = mapped_column(String(200))
    description: Mapped[str] = mapped_column(Text, default="")
    model_card: Mapped[str] = mapped_column(Text, default="")
    task: Mapped[str] = mapped_column(String(60))
    input_schema: Mapped[dict[str, Any]] = mapped_column(JSON)
    output_schema: Mapped[dict[str, Any]] = mapped_column(JSON)
    tags: Mapped[list[str]] = mapped_column(JSON)
    licence: Mapped[str] = mapped_column(String(100), default="proprietary")
    hosting: Mapped[Hosting] = mapped_column(EnumText(Hosting))
    status: Mapped[OfferingStatus] = mapped_column(EnumText(OfferingStatus), default=OfferingStatus.DRAFT)
    # public | organisation | shared (docs/sharing.md; marketplace.services.sharing decides)
    visibility: Mapped[str] = mapped_column(String(20), default="public", server_default="public")
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)

    __table_args__ = (Index("ix_offerings_status_task", "status", "task"),)


class OfferingVersion(Base):
    __tablename__ = "offering_versions"

    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("ver"))
    offering_id: Mapped[str] = mapped_column(ForeignKey("offerings.id"), index=True)
    number: Mapped[int] = mapped_column(Integer)
    format: Mapped[str] = mapped_column(String(10))  # onnx | npz
    digest: Mapped[str] = mapped_column(String(80))  # sha256:<hex> of the plaintext artifact
    size: Mapped[int] = mapped_column(BigInteger)
    input_shape: Mapped[list[int]] = mapped_column(JSON)
    info: Mapped[dict[str, Any]] = mapped_column(JSON)  # operators, layer shapes, dims
    he_plan: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    he_report: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    # declared metrics, notes, parent (marketplace.services.validation) and the validation report
    meta: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    validation: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class Artifact(Base):
    """An envelope-encrypted blob: the ciphertext lives in the blob store, the wrapped DEK here."""

    __tablename__ = "artifacts"

    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("art"))
    version_id: Mapped[str] = mapped_column(ForeignKey("offering_versions.id"), index=True)
    purpose: Mapped[str] = mapped_column(String(20))  # model | compiled
    blob: Mapped[str] = mapped_column(String(80))  # sha256 address of the ciphertext
    wrapped_key: Mapped[bytes] = mapped_column(LargeBinary)
    kek_id: Mapped[str] = mapped_column(String(80))
    aad: Mapped[str] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class AuditEvent(Base):
    """Append-only: rows are inserted, never updated or deleted."""

    __tablename__ = "audit_events"

    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(40), unique=True, default=lambda: new_id("evt"))
    time: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow, index=True)
    actor: Mapped[str] = mapped_column(String(80))  # key id, or "system", or "anonymous"
    org_id: Mapped[str | None] = mapped_column(String(40), nullable=True, index=True)
    action: Mapped[str] = mapped_column(String(60), index=True)
    target: Mapped[str] = mapped_column(String(200), default="")
    outcome: Mapped[str] = mapped_column(String(20))  # success | denied | failure
    request_id: Mapped[str] = mapped_column(String(80), default="")
    detail: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
