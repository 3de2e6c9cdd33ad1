"""Monitoring tables: adoption per minute (from ledgered usage), latency per minute and process.

For: the time series behind ``/v1/monitoring/*`` and the dashboards. Rows are keyed by offering,
version, mode and the minute they describe (``t``: Unix seconds of the minute's start); hours and
days are aggregated on read.

* ``monitoring_usage``: written only by the roll-up (:mod:`marketplace.services.monitoring_store`),
  which reads the usage records that have ledger leaves, in leaf order, past a watermark
  (``monitoring_state``), under a lock. Each row says which leaves it summarises (first, last,
  count), so the figures can be checked against the ledger export.
* ``monitoring_latency``: written by each API process (``writer``) for its own inferences: one
  row per key and writer, overwritten with that process's cumulative minute aggregate, so several
  processes and replicas never contend for a row; readers add the rows up. ``hist`` holds counts
  per fixed bucket (:data:`marketplace.services.monitoring.BUCKETS` plus overflow), so quantiles
  merge across rows.

Not for: raw per-request data (the usage records and the ledger are that).
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import JSON, BigInteger, Float, Index, Integer, String
from sqlalchemy.orm import Mapped, mapped_column

from marketplace.db.base import Base

__all__ = ["MonitoringLatency", "MonitoringState", "MonitoringUsage"]


class MonitoringUsage(Base):
    """Adoption in one minute of one offering version and mode, from charged usage leaves."""

    __tablename__ = "monitoring_usage"

    offering_id: Mapped[str] = mapped_column(String(40), primary_key=True)
    version: Mapped[int] = mapped_column(Integer, primary_key=True)
    mode: Mapped[str] = mapped_column(String(20), primary_key=True)
    t: Mapped[int] = mapped_column(BigInteger, primary_key=True)  # minute start, Unix seconds
    provider_org_id: Mapped[str] = mapped_column(String(40), index=True)
    calls: Mapped[int] = mapped_column(Integer, default=0)
    units: Mapped[int] = mapped_column(BigInteger, default=0)
    revenue: Mapped[dict[str, Any]] = mapped_column(JSON)  # {currency: amount in minor units}
    consumers: Mapped[list[str]] = mapped_column(JSON)  # distinct consumer org ids
    contracts: Mapped[list[str]] = mapped_column(JSON)  # distinct contracts used
    released: Mapped[int] = mapped_column(Integer, default=0)  # uncharged (released) usage leaves
    leaf_first: Mapped[int] = mapped_column(BigInteger)  # ledger index range of the charged leaves
    leaf_last: Mapped[int] = mapped_column(BigInteger)
    leaf_count: Mapped[int] = mapped_column(Integer, default=0)

    __table_args__ = (Index("ix_monitoring_usage_t", "t"),)


class MonitoringLatency(Base):
    """One process's inference latency in one minute of one offering version and mode."""

    __tablename__ = "monitoring_latency"

    offering_id: Mapped[str] = mapped_column(String(40), primary_key=True)
    version: Mapped[int] = mapped_column(Integer, primary_key=True)
    mode: Mapped[str] = mapped_column(String(20), primary_key=True)
    t: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    writer: Mapped[str] = mapped_column(String(80), primary_key=True)  # host:pid:nonce
    calls: Mapped[int] = mapped_column(Integer, default=0)
    errors: Mapped[dict[str, Any]] = mapped_column(JSON)  # {error class: count}
    hist: Mapped[list[int]] = mapped_column(JSON)  # total latency: counts per bucket (+ overflow)
    sum_total: Mapped[float] = mapped_column(Float, default=0.0)
    sum_queue: Mapped[float] = mapped_column(Float, default=0.0)
    sum_model: Mapped[float] = mapped_column(Float, default=0.0)
    sum_overhead: Mapped[float] = mapped_column(Float, default=0.0)

    __table_args__ = (Index("ix_monitoring_latency_t", "t"),)


class MonitoringState(Base):
    """The roll-up's watermark: the last ledger index it has summarised (one row, id 1)."""

    __tablename__ = "monitoring_state"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    last_index: Mapped[int] = mapped_column(BigInteger, default=-1)
