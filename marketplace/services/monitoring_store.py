"""Writes the monitoring tables: latency flushes (per process) and the adoption roll-up (from the ledger).

For: :func:`flush` (this process's minute aggregates from :mod:`marketplace.services.monitoring`
into ``monitoring_latency``, one upsert statement per flush, rows keyed by this process's writer
id so replicas never contend) and :func:`rollup` (charged and released usage records that have
ledger leaves, past the watermark, in leaf order, into ``monitoring_usage``), and
:class:`Flusher` (a background thread doing both every ``SOM_MONITORING_FLUSH_SECONDS``).
Not for: reading the series (:mod:`marketplace.services.monitoring_query`).

The roll-up is exact and serialized: it locks the watermark row (``SELECT ... FOR UPDATE`` on
PostgreSQL; SQLite transactions are ``BEGIN IMMEDIATE``), reads the usage records whose
``ledger_index`` is past it, adds them to their minute rows and moves the watermark, in one
transaction. Ledger indexes are assigned under the ledger's sequencer lock and committed in that
order, so a record below the watermark can never appear later: each leaf is counted exactly once.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session

from marketplace.db.models import Offering, OfferingVersion
from marketplace.db.models_contracts import UsageRow
from marketplace.db.models_monitoring import MonitoringLatency, MonitoringState, MonitoringUsage
from marketplace.runtime import Runtime
from marketplace.services import monitoring

__all__ = ["ROLLUP_BATCH", "Flusher", "flush", "minute_of", "rollup", "version_at"]

log = logging.getLogger("som.monitoring")

#: Usage records summarised per roll-up transaction (short transactions; it loops).
ROLLUP_BATCH = 5000
_LATENCY_KEYS = ("offering_id", "version", "mode", "t", "writer")


def minute_of(t: datetime) -> int:
    """Unix seconds of the start of ``t``'s minute."""
    return int(t.timestamp()) // 60 * 60


def _upsert(s: Session, rows: Sequence[dict[str, Any]]) -> None:
    """One INSERT ... ON CONFLICT DO UPDATE statement, executed for every row (executemany)."""
    insert = sqlite_insert if s.get_bind().dialect.name == "sqlite" else pg_insert
    stmt = insert(MonitoringLatency)
    cols = {c: stmt.excluded[c] for c in rows[0] if c not in _LATENCY_KEYS}
    s.execute(stmt.on_conflict_do_update(index_elements=list(_LATENCY_KEYS), set_=cols), list(rows))


def flush(rt: Runtime) -> int:
    """Write this process's changed minute aggregates (cumulative values, so a repeated write is
    harmless); how many rows were written. Aggregates of offerings this database does not know
    (another runtime in the same process, as in tests) are left for their own runtime."""
    items = monitoring.pending()
    if not items:
        return 0
    writer = monitoring.writer_id()
    with rt.tx() as s:
        known = set(s.scalars(select(Offering.id).where(Offering.id.in_({k[0] for k, _, _ in items}))))
        mine = [(k, seq, vals) for k, seq, vals in items if k[0] in known]
        if mine:
            _upsert(
                s,
                [
                    {"offering_id": k[0], "version": k[1], "mode": k[2], "t": k[3], "writer": writer, **vals}
                    for k, _, vals in mine
                ],
            )
    monitoring.mark_flushed([(k, seq) for k, seq, _ in mine])
    return len(mine)


# -- the adoption roll-up ----------------------------------------------------------------------------


def _lock_state(s: Session) -> MonitoringState:
    if s.get(MonitoringState, 1) is None:
        insert = sqlite_insert if s.get_bind().dialect.name == "sqlite" else pg_insert
        s.execute(insert(MonitoringState).values(id=1, last_index=-1).on_conflict_do_nothing(index_elements=["id"]))
    stmt = select(MonitoringState).where(MonitoringState.id == 1)
    if s.get_bind().dialect.name != "sqlite":
        stmt = stmt.with_for_update()
    st = s.scalars(stmt).one()
    s.refresh(st)
    return st


def version_at(versions: Sequence[tuple[int, datetime]], t: datetime) -> int:
    """The version serving at ``t``: the newest created at or before ``t`` (0: none yet).
    ``versions`` is ``(number, created_at)`` in ascending order."""
    best = 0
    for number, created in versions:
        if created <= t:
            best = number
    return best


def _versions(s: Session, offering_ids: set[str]) -> dict[str, list[tuple[int, datetime]]]:
    out: dict[str, list[tuple[int, datetime]]] = {o: [] for o in offering_ids}
    rows = s.execute(
        select(OfferingVersion.offering_id, OfferingVersion.number, OfferingVersion.created_at)
        .where(OfferingVersion.offering_id.in_(offering_ids))
        .order_by(OfferingVersion.number)
    )
    for off, number, created in rows:
        out[off].append((number, created))
    return out


def _new_usage_row(key: tuple[str, int, str, int], provider: str) -> MonitoringUsage:
    off, version, mode, t = key
    return MonitoringUsage(
        offering_id=off,
        version=version,
        mode=mode,
        t=t,
        provider_org_id=provider,
        calls=0,
        units=0,
        revenue={},
        consumers=[],
        contracts=[],
        released=0,
        leaf_first=-1,
        leaf_last=-1,
        leaf_count=0,
    )


def _add(row: MonitoringUsage, u: Any) -> None:
    if u.state != "charged":
        row.released = (row.released or 0) + 1
        return
    rec = u.record or {}
    row.calls = (row.calls or 0) + 1
    row.units = (row.units or 0) + int(u.units)
    cur = str(rec.get("currency", ""))
    revenue = dict(row.revenue or {})
    revenue[cur] = int(revenue.get(cur, 0)) + int(rec.get("amount_minor", 0))
    row.revenue = revenue
    if u.consumer_org_id not in (row.consumers or []):
        row.consumers = [*(row.consumers or []), u.consumer_org_id]
    if u.contract_id not in (row.contracts or []):
        row.contracts = [*(row.contracts or []), u.contract_id]
    idx = int(u.ledger_index)
    row.leaf_first = idx if row.leaf_first is None or row.leaf_first < 0 else min(row.leaf_first, idx)
    row.leaf_last = max(row.leaf_last if row.leaf_last is not None else -1, idx)
    row.leaf_count = (row.leaf_count or 0) + 1


def _rollup_batch(s: Session, batch: int) -> int:
    st = _lock_state(s)
    usage = s.execute(
        select(
            UsageRow.ledger_index,
            UsageRow.offering_id,
            UsageRow.provider_org_id,
            UsageRow.consumer_org_id,
            UsageRow.contract_id,
            UsageRow.mode,
            UsageRow.units,
            UsageRow.state,
            UsageRow.reserved_at,
            UsageRow.record,
        )
        .where(UsageRow.ledger_index > st.last_index, UsageRow.state.in_(("charged", "released")))
        .order_by(UsageRow.ledger_index)
        .limit(batch)
    ).all()
    if not usage:
        return 0
    versions = _versions(s, {u.offering_id for u in usage})
    grouped: dict[tuple[str, int, str, int], list[Any]] = {}
    for u in usage:
        key = (u.offering_id, version_at(versions[u.offering_id], u.reserved_at), u.mode, minute_of(u.reserved_at))
        grouped.setdefault(key, []).append(u)
    for key, items in grouped.items():
        row = s.get(MonitoringUsage, key)
        if row is None:
            row = _new_usage_row(key, items[0].provider_org_id)
            s.add(row)
        for u in items:
            _add(row, u)
    st.last_index = int(usage[-1].ledger_index)
    return len(usage)


def rollup(rt: Runtime, *, batch: int = ROLLUP_BATCH) -> int:
    """Summarise every ledgered usage record past the watermark; how many were summarised.
    Cheap when there is nothing new (one indexed read, no write lock)."""
    with rt.sessions() as s:
        newest = s.scalar(select(func.max(UsageRow.ledger_index)))
        st = s.get(MonitoringState, 1)
        if newest is None or (st is not None and st.last_index >= newest):
            return 0
    n = 0
    while True:
        with rt.tx() as s:
            done = _rollup_batch(s, batch)
        n += done
        if done < batch:
            return n


class Flusher:
    """Flushes latency aggregates and rolls adoption up every ``interval`` seconds (a daemon
    thread started with the app's lifespan; the monitoring API also does both before it reads)."""

    def __init__(self, rt: Runtime, interval: float) -> None:
        self.rt = rt
        self.interval = max(0.5, float(interval))
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="som-monitoring", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
        self._tick()

    def _tick(self) -> None:
        try:
            flush(self.rt)
            rollup(self.rt)
        except Exception:  # noqa: BLE001 - a failed flush is retried next tick; never kill the thread
            log.exception("monitoring flush failed")

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._tick()
