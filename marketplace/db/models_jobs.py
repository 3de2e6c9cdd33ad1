"""Tables of remote-execution jobs and provider agents.

For: the job queue (sealed inputs and results are blob addresses, never bytes in the DB), the
agents that serve provider-hosted offerings (presence, sealing key), and agent tasks (one HE
evaluation relayed to an agent by :func:`marketplace.services.dispatch.run_on_agent`).
Not for: payloads (the blob store holds opaque sealed bytes or ciphertexts) or usage records
(metering's tables), or how leases are taken and lost (:mod:`marketplace.services.leases`).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, ClassVar

from sqlalchemy import JSON, BigInteger, Boolean, ForeignKey, Index, Integer, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from marketplace.db.base import Base, UTCDateTime, new_id, utcnow

__all__ = ["Agent", "AgentTask", "Job", "Leased"]


class Leased:
    """The lease columns of a table of work handed to one compute site at a time.

    ``lease_owner`` holds it until ``lease_expires_at``; ``attempts`` counts the leases taken.
    A table names its queued and held states (``QUEUED`` / ``HELD``) for
    :mod:`marketplace.services.leases`; the columns (and so the schema) are the ones both tables
    always had, so no migration is needed.
    """

    QUEUED: ClassVar[str] = "queued"
    HELD: ClassVar[str]

    id: Mapped[str]
    status: Mapped[str]
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    lease_owner: Mapped[str | None] = mapped_column(String(60), nullable=True)
    lease_expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)


class Agent(Base):
    """One running ``som agent`` process (an instance of an agent key)."""

    __tablename__ = "agents"

    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("agt"))
    org_id: Mapped[str] = mapped_column(ForeignKey("orgs.id"), index=True)
    key_id: Mapped[str] = mapped_column(ForeignKey("api_keys.id"), index=True)
    name: Mapped[str] = mapped_column(String(200), default="")
    offering_ids: Mapped[list[str]] = mapped_column(JSON)
    seal_public: Mapped[str] = mapped_column(String(80))  # x25519:<b64>, inputs are sealed to it
    # offering_id -> the provider's signed som.seal-key/v1 statement vouching for seal_public
    seal_statements: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    capabilities: Mapped[list[str]] = mapped_column(JSON)  # predict, evaluate, custom, he_infer
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    last_seen_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow, index=True)
    stopped_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)


class Job(Leased, Base):
    """A remote-execution job. ``input_blob`` / ``result_blob`` hold sealed (HPKE) bytes only."""

    __tablename__ = "jobs"
    HELD: ClassVar[str] = "running"

    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("job"))
    org_id: Mapped[str] = mapped_column(ForeignKey("orgs.id"), index=True)  # consumer
    submitted_by: Mapped[str] = mapped_column(String(40))
    offering_id: Mapped[str] = mapped_column(ForeignKey("offerings.id"), index=True)
    provider_org_id: Mapped[str] = mapped_column(String(40), index=True)
    hosting: Mapped[str] = mapped_column(String(20))  # marketplace | provider
    kind: Mapped[str] = mapped_column(String(20))  # predict | evaluate | custom
    status: Mapped[str] = mapped_column(String(20), default="queued")
    seal_public: Mapped[str] = mapped_column(String(80))  # the compute site key the input is sealed to
    # provider-hosted: the provider's signed statement vouching for seal_public (the consumer checks it)
    seal_statement: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    input_blob: Mapped[str] = mapped_column(String(80))
    input_size: Mapped[int] = mapped_column(BigInteger)
    input_digest: Mapped[str] = mapped_column(String(80))
    code: Mapped[str | None] = mapped_column(Text, nullable=True)  # custom: shown to the provider
    code_digest: Mapped[str | None] = mapped_column(String(80), nullable=True)
    units: Mapped[int] = mapped_column(Integer, default=1)
    limits: Mapped[dict[str, Any]] = mapped_column(JSON)  # cpu_seconds, memory_mb, wall_seconds
    idempotency_key: Mapped[str] = mapped_column(String(200))
    request_digest: Mapped[str] = mapped_column(String(80))
    contract_id: Mapped[str | None] = mapped_column(String(40), nullable=True)
    reservation: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    max_attempts: Mapped[int] = mapped_column(Integer, default=3)
    finishing: Mapped[bool] = mapped_column(Boolean, default=False)
    result_blob: Mapped[str | None] = mapped_column(String(80), nullable=True)
    result_size: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    error_reason: Mapped[str | None] = mapped_column(String(40), nullable=True)
    usage_id: Mapped[str | None] = mapped_column(String(60), nullable=True)
    receipt: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    charged: Mapped[bool] = mapped_column(Boolean, default=False)
    decided_by: Mapped[str | None] = mapped_column(String(40), nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    deadline_at: Mapped[datetime] = mapped_column(UTCDateTime())  # queued/running past this: expired
    result_expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    fetched_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)

    __table_args__ = (
        Index("ix_jobs_status_offering", "status", "offering_id"),
        Index("ix_jobs_org_idem", "org_id", "idempotency_key", unique=True),
        Index("ix_jobs_lease_expires_at", "lease_expires_at"),  # the reaper's scan (was index=True)
    )


class AgentTask(Leased, Base):
    """One unit of work relayed to an agent and awaited by an API request (``run_on_agent``)."""

    __tablename__ = "agent_tasks"
    HELD: ClassVar[str] = "leased"

    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("tsk"))
    offering_id: Mapped[str] = mapped_column(ForeignKey("offerings.id"), index=True)
    kind: Mapped[str] = mapped_column(String(20))  # he_infer
    status: Mapped[str] = mapped_column(String(20), default="queued")  # queued|leased|done|failed
    payload_blob: Mapped[str] = mapped_column(String(80))
    meta: Mapped[dict[str, Any]] = mapped_column(JSON)
    result_blob: Mapped[str | None] = mapped_column(String(80), nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    deadline_at: Mapped[datetime] = mapped_column(UTCDateTime(), index=True)

    __table_args__ = (Index("ix_agent_tasks_status_offering", "status", "offering_id"),)
