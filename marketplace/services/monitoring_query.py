"""Reads the monitoring series: a provider's offering, a consumer's contracts, the marketplace.

For: the three reports behind ``/v1/monitoring/*``, in bounded windows of minutes, hours or days.
Every report first flushes this process's latency aggregates and rolls ledgered usage up, so it
is current to the last committed use. Series are columnar (``t`` plus one array per figure,
aligned), ready for a chart: only buckets with data are listed.

Not for: writing (:mod:`marketplace.services.monitoring_store`), HTTP (``marketplace.api``).

Who sees what: a provider sees its own offerings (another organisation's, or a consumer's view of
any offering, is 404); a consumer sees its own contracts' usage, with latency measured on its
own usage records (reservation to charge), never other consumers' figures; compliance officers
(and admins) see the marketplace.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.exc import SQLAlchemyError

from contracts.offer import Status
from marketplace.db.base import utcnow
from marketplace.db.models import Offering
from marketplace.db.models_contracts import ContractRow, UsageRow
from marketplace.db.models_monitoring import MonitoringLatency, MonitoringUsage
from marketplace.errors import Invalid, NotFound
from marketplace.runtime import Runtime
from marketplace.services import monitoring, monitoring_store
from marketplace.services.identity import Principal

__all__ = [
    "MAX_RANGE",
    "QUANTILES",
    "Step",
    "Window",
    "contracts_report",
    "marketplace_report",
    "offering_report",
    "offerings_summary",
    "window",
]


log = logging.getLogger("som.monitoring")


class Step(StrEnum):
    MINUTE = "minute"
    HOUR = "hour"
    DAY = "day"


STEP_SECONDS = {Step.MINUTE: 60, Step.HOUR: 3600, Step.DAY: 86400}
#: Longest window per step (31 days of minutes is 44,640 points).
MAX_RANGE = {Step.MINUTE: timedelta(days=31), Step.HOUR: timedelta(days=366), Step.DAY: timedelta(days=3660)}
DEFAULT_RANGE = {Step.MINUTE: timedelta(hours=24), Step.HOUR: timedelta(days=7), Step.DAY: timedelta(days=30)}
QUANTILES = (("p50", 0.5), ("p95", 0.95), ("p99", 0.99))


@dataclass(frozen=True)
class Window:
    """``[start, end)`` in Unix seconds, aligned to ``step``."""

    start: int
    end: int
    step: Step

    @property
    def seconds(self) -> int:
        return STEP_SECONDS[self.step]

    def bucket(self, t: int) -> int:
        return t // self.seconds * self.seconds

    def public(self) -> dict[str, Any]:
        return {"from": _iso(self.start), "to": _iso(self.end), "step": self.step.value, "step_seconds": self.seconds}


def _iso(t: int) -> str:
    return datetime.fromtimestamp(t, UTC).isoformat().replace("+00:00", "Z")


def _aware(t: datetime) -> datetime:
    return t if t.tzinfo is not None else t.replace(tzinfo=UTC)


def window(frm: datetime | None, to: datetime | None, step: str, *, now: datetime | None = None) -> Window:
    """The window the parameters name, or :class:`Invalid` (422): unknown step, ``from`` after
    ``to``, or longer than :data:`MAX_RANGE` for the step."""
    try:
        st = Step(step)
    except ValueError:
        raise Invalid(f"step: expected one of {[s.value for s in Step]}, got {step!r}") from None
    end = _aware(to) if to is not None else (now or utcnow())
    start = _aware(frm) if frm is not None else end - DEFAULT_RANGE[st]
    if not (start.year >= 1971 and end.year <= 9998):
        raise Invalid("from and to must lie between the years 1971 and 9998")
    if start >= end:
        raise Invalid("from must be before to")
    if end - start > MAX_RANGE[st]:
        raise Invalid(f"the range is over {MAX_RANGE[st].days} days for step={st.value}; use a coarser step")
    sec = STEP_SECONDS[st]
    s0 = int(start.timestamp()) // sec * sec
    e0 = -(-int(end.timestamp()) // sec) * sec
    return Window(s0, max(e0, s0 + sec), st)


def _refresh(rt: Runtime) -> None:
    """Flush and roll up before a read; if the database is busy, read what is there (the
    background flusher catches up) rather than fail the read."""
    try:
        monitoring_store.flush(rt)
        monitoring_store.rollup(rt)
    except SQLAlchemyError:
        log.warning("monitoring refresh before a read failed; answering from the stored rows", exc_info=True)


# -- series ------------------------------------------------------------------------------------------


def _adoption(rows: Iterable[MonitoringUsage], win: Window) -> dict[str, Any]:
    b: dict[int, dict[str, Any]] = {}
    modes: set[str] = set()
    for r in rows:
        x = b.setdefault(
            win.bucket(r.t),
            {
                "calls": 0,
                "units": 0,
                "revenue": {},
                "consumers": set(),
                "contracts": set(),
                "released": 0,
                "first": None,
                "last": None,
                "count": 0,
                "mode": {},
            },
        )
        x["calls"] += r.calls
        x["units"] += r.units
        for cur, amt in (r.revenue or {}).items():
            x["revenue"][cur] = x["revenue"].get(cur, 0) + int(amt)
        x["consumers"].update(r.consumers or [])
        x["contracts"].update(r.contracts or [])
        x["released"] += r.released
        if r.leaf_count:
            x["first"] = r.leaf_first if x["first"] is None else min(x["first"], r.leaf_first)
            x["last"] = r.leaf_last if x["last"] is None else max(x["last"], r.leaf_last)
            x["count"] += r.leaf_count
        x["mode"][r.mode] = x["mode"].get(r.mode, 0) + r.calls
        modes.add(r.mode)
    ts = sorted(b)
    currencies = sorted({c for x in b.values() for c in x["revenue"]})
    return {
        "t": ts,
        "calls": [b[t]["calls"] for t in ts],
        "units": [b[t]["units"] for t in ts],
        "consumers": [len(b[t]["consumers"]) for t in ts],
        "contracts": [len(b[t]["contracts"]) for t in ts],
        "released": [b[t]["released"] for t in ts],
        "revenue": {c: [b[t]["revenue"].get(c, 0) for t in ts] for c in currencies},
        "calls_by_mode": {m: [b[t]["mode"].get(m, 0) for t in ts] for m in sorted(modes)},
        "leaves": {
            "first": [b[t]["first"] for t in ts],
            "last": [b[t]["last"] for t in ts],
            "count": [b[t]["count"] for t in ts],
        },
    }


def _totals(rows: list[MonitoringUsage]) -> dict[str, Any]:
    revenue: dict[str, int] = {}
    for r in rows:
        for cur, amt in (r.revenue or {}).items():
            revenue[cur] = revenue.get(cur, 0) + int(amt)
    return {
        "calls": sum(r.calls for r in rows),
        "units": sum(r.units for r in rows),
        "revenue": revenue,
        "consumers": len({c for r in rows for c in (r.consumers or [])}),
        "contracts": len({c for r in rows for c in (r.contracts or [])}),
        "leaf_count": sum(r.leaf_count for r in rows),
        "released": sum(r.released for r in rows),
    }


def _hist_series(buckets: dict[int, dict[str, Any]]) -> dict[str, Any]:
    ts = sorted(buckets)
    out: dict[str, Any] = {
        "t": ts,
        "calls": [buckets[t]["calls"] for t in ts],
        "errors": [sum(buckets[t]["errors"].values()) for t in ts],
    }
    for name, q in QUANTILES:
        out[name] = [monitoring.quantile(buckets[t]["hist"], q) for t in ts]
    for phase in ("total", "queue", "model", "overhead"):
        out[f"mean_{phase}"] = [buckets[t][phase] / buckets[t]["calls"] if buckets[t]["calls"] else None for t in ts]
    return out


def _new_hist() -> dict[str, Any]:
    return {
        "calls": 0,
        "errors": {},
        "hist": [0] * (len(monitoring.BUCKETS) + 1),
        "total": 0.0,
        "queue": 0.0,
        "model": 0.0,
        "overhead": 0.0,
    }


def _latency(rows: Iterable[MonitoringLatency], win: Window) -> dict[str, Any]:
    by_mode: dict[str, dict[int, dict[str, Any]]] = {}
    errors: dict[str, int] = {}
    for r in rows:
        x = by_mode.setdefault(r.mode, {}).setdefault(win.bucket(r.t), _new_hist())
        x["calls"] += r.calls
        for cls, n in (r.errors or {}).items():
            x["errors"][cls] = x["errors"].get(cls, 0) + int(n)
            errors[cls] = errors.get(cls, 0) + int(n)
        x["hist"] = [a + int(b) for a, b in zip(x["hist"], r.hist or [], strict=False)]
        x["total"] += r.sum_total
        x["queue"] += r.sum_queue
        x["model"] += r.sum_model
        x["overhead"] += r.sum_overhead
    return {
        "buckets": list(monitoring.BUCKETS),
        "errors_by_class": errors,
        "by_mode": {m: _hist_series(b) for m, b in sorted(by_mode.items())},
    }


def _in(win: Window, model: Any) -> Any:
    return (model.t >= win.start, model.t < win.end)


# -- reports -----------------------------------------------------------------------------------------


def offering_report(
    rt: Runtime, p: Principal, offering_id: str, win: Window, *, version: int | None = None
) -> dict[str, Any]:
    """A provider's own offering: adoption and latency. 404 for anyone else's offering."""
    _refresh(rt)
    with rt.tx() as s:
        off = s.get(Offering, offering_id)
        if off is None or off.org_id != p.org_id:
            raise NotFound(f"offering {offering_id} not found", denied=offering_id if off else None)
        uq = select(MonitoringUsage).where(MonitoringUsage.offering_id == off.id, *_in(win, MonitoringUsage))
        lq = select(MonitoringLatency).where(MonitoringLatency.offering_id == off.id, *_in(win, MonitoringLatency))
        if version is not None:
            uq = uq.where(MonitoringUsage.version == version)
            lq = lq.where(MonitoringLatency.version == version)
        usage = list(s.scalars(uq))
        latency = list(s.scalars(lq))
        active = (
            s.scalar(
                select(func.count())
                .select_from(ContractRow)
                .where(ContractRow.offering_id == off.id, ContractRow.status == Status.ACTIVE.value)
            )
            or 0
        )
        name = off.name
    return {
        "offering_id": offering_id,
        "name": name,
        **win.public(),
        "version": version,
        "versions": sorted({r.version for r in usage} | {r.version for r in latency}),
        "active_contracts": int(active),
        "totals": _totals(usage),
        "adoption": _adoption(usage, win),
        "latency": _latency(latency, win),
    }


def contracts_report(rt: Runtime, p: Principal, win: Window) -> dict[str, Any]:
    """The caller's organisation's contracts as consumer: usage and latency per contract, from its
    own ledgered usage records (latency: reservation to charge, as the marketplace measured it)."""
    start, end = datetime.fromtimestamp(win.start, UTC), datetime.fromtimestamp(win.end, UTC)
    with rt.tx() as s:
        contracts = list(
            s.execute(
                select(ContractRow.id, ContractRow.offering_id, ContractRow.status, Offering.name)
                .join(Offering, Offering.id == ContractRow.offering_id)
                .where(ContractRow.consumer_org_id == p.org_id)
                .order_by(ContractRow.created_at)
            )
        )
        usage = list(
            s.execute(
                select(
                    UsageRow.contract_id,
                    UsageRow.mode,
                    UsageRow.units,
                    UsageRow.reserved_at,
                    UsageRow.finished_at,
                    UsageRow.record,
                ).where(
                    UsageRow.consumer_org_id == p.org_id,
                    UsageRow.state == "charged",
                    UsageRow.ledger_index.is_not(None),
                    UsageRow.reserved_at >= start,
                    UsageRow.reserved_at < end,
                )
            )
        )
    per: dict[str, dict[int, dict[str, Any]]] = {c.id: {} for c in contracts}
    for u in usage:
        x = per.setdefault(u.contract_id, {}).setdefault(
            win.bucket(int(u.reserved_at.timestamp())), {**_new_hist(), "units": 0, "spend": 0, "mode": {}}
        )
        d = max(0.0, (u.finished_at - u.reserved_at).total_seconds()) if u.finished_at else 0.0
        x["calls"] += 1
        x["units"] += int(u.units)
        x["spend"] += int((u.record or {}).get("amount_minor", 0))
        x["hist"][monitoring.bucket_index(d)] += 1
        x["total"] += d
        x["mode"][u.mode] = x["mode"].get(u.mode, 0) + 1
    out = []
    for c in contracts:
        b = per.get(c.id, {})
        ts = sorted(b)
        series = {
            "t": ts,
            "calls": [b[t]["calls"] for t in ts],
            "units": [b[t]["units"] for t in ts],
            "spend": [b[t]["spend"] for t in ts],
        }
        for name, q in QUANTILES:
            series[name] = [monitoring.quantile(b[t]["hist"], q) for t in ts]
        out.append(
            {
                "contract_id": c.id,
                "offering_id": c.offering_id,
                "offering_name": c.name,
                "status": c.status,
                "totals": {"calls": sum(series["calls"]), "units": sum(series["units"]), "spend": sum(series["spend"])},
                "series": series,
            }
        )
    return {**win.public(), "contracts": out}


def marketplace_report(rt: Runtime, p: Principal, win: Window) -> dict[str, Any]:
    """Marketplace-wide usage and latency (compliance, admin): by mode, and totals per offering."""
    p.require("compliance", "admin")
    _refresh(rt)
    with rt.tx() as s:
        usage = list(s.scalars(select(MonitoringUsage).where(*_in(win, MonitoringUsage))))
        latency = list(s.scalars(select(MonitoringLatency).where(*_in(win, MonitoringLatency))))
        names = dict(
            s.execute(
                select(Offering.id, Offering.name).where(
                    Offering.id.in_({r.offering_id for r in usage} | {r.offering_id for r in latency})
                )
            ).all()
        )
    by_off: dict[str, list[MonitoringUsage]] = {}
    for r in usage:
        by_off.setdefault(r.offering_id, []).append(r)
    offerings = [
        {"offering_id": o, "name": names.get(o, ""), "provider_org_id": rows[0].provider_org_id, **_totals(rows)}
        for o, rows in by_off.items()
    ]
    offerings.sort(key=lambda x: (-x["calls"], x["offering_id"]))
    return {
        **win.public(),
        "totals": _totals(usage),
        "offerings": offerings,
        "adoption": _adoption(usage, win),
        "latency": _latency(latency, win),
    }


def offerings_summary(rt: Runtime, p: Principal, win: Window) -> dict[str, Any]:
    """The caller's organisation's offerings (as provider) with their totals in ``win``."""
    _refresh(rt)
    with rt.tx() as s:
        offs = list(
            s.execute(
                select(Offering.id, Offering.name, Offering.status, Offering.hosting)
                .where(Offering.org_id == p.org_id)
                .order_by(Offering.created_at, Offering.id)
            )
        )
        usage = list(
            s.scalars(
                select(MonitoringUsage).where(MonitoringUsage.provider_org_id == p.org_id, *_in(win, MonitoringUsage))
            )
        )
    by_off: dict[str, list[MonitoringUsage]] = {}
    for r in usage:
        by_off.setdefault(r.offering_id, []).append(r)
    items = [
        {
            "offering_id": o.id,
            "name": o.name,
            "status": o.status,
            "hosting": o.hosting,
            "totals": _totals(by_off.get(o.id, [])),
        }
        for o in offs
    ]
    return {**win.public(), "offerings": items}
