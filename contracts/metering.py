"""Charge math and statements: what a contract's usage costs over a period, to the cent.

For: ``units * unit_price_minor`` (exact integers), statements built from ``som.usage/v1`` ledger
records (the provider's full ledger view or the consumer's receipts: same records, same
statement), CSV export, and :func:`reconcile` to show two views agree.
Not for: deciding whether a use is allowed (:mod:`contracts.policy`), taxes, invoicing or FX.

Amounts are integers in the currency's minor unit; :class:`decimal.Decimal` appears only when
formatting major units (``12.34``). Released (failed) uses appear as lines with amount 0 and do
not count in the totals. The period is half-open: ``period_start <= time < period_end``.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from contracts._validate import describe, format_time, parse_time, require_utc
from contracts.errors import StatementMismatch
from contracts.offer import Contract
from contracts.records import USAGE_SCHEMA, validate_record
from contracts.terms import MODES, format_minor

__all__ = ["Statement", "StatementLine", "charge_minor", "reconcile", "statement"]


def charge_minor(units: int, unit_price_minor: int) -> int:
    """``units * unit_price_minor`` for non-negative integers; exact."""
    for name, v in (("units", units), ("unit_price_minor", unit_price_minor)):
        if type(v) is not int or v < 0:
            raise ValueError(f"{name}: expected an integer >= 0, got {describe(v)}")
    return units * unit_price_minor


@dataclass(frozen=True)
class StatementLine:
    usage_id: str
    time: str
    mode: str
    outcome: str
    units: int
    unit_price_minor: int
    amount_minor: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "usage_id": self.usage_id,
            "time": self.time,
            "mode": self.mode,
            "outcome": self.outcome,
            "units": self.units,
            "unit_price_minor": self.unit_price_minor,
            "amount_minor": self.amount_minor,
        }


@dataclass(frozen=True)
class Statement:
    """Usage of one contract over ``[period_start, period_end)``, lines sorted by (time, usage_id)."""

    contract_id: str
    offering_id: str
    provider_org: str
    consumer_org: str
    currency: str
    period_start: datetime
    period_end: datetime
    lines: tuple[StatementLine, ...]
    units_by_mode: Mapping[str, int]
    amount_by_mode: Mapping[str, int]
    total_units: int
    total_amount_minor: int
    released_count: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "contract_id": self.contract_id,
            "offering_id": self.offering_id,
            "provider_org": self.provider_org,
            "consumer_org": self.consumer_org,
            "currency": self.currency,
            "period_start": format_time(self.period_start),
            "period_end": format_time(self.period_end),
            "lines": [ln.to_dict() for ln in self.lines],
            "units_by_mode": dict(self.units_by_mode),
            "amount_by_mode": dict(self.amount_by_mode),
            "total_units": self.total_units,
            "total_amount_minor": self.total_amount_minor,
            "total_amount": format_minor(self.total_amount_minor, self.currency),
            "released_count": self.released_count,
        }

    def to_csv(self) -> str:
        """One row per line; ``amount`` in major units (exact decimal string)."""
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(
            [
                "contract_id",
                "usage_id",
                "time",
                "mode",
                "outcome",
                "units",
                "unit_price_minor",
                "amount_minor",
                "currency",
                "amount",
            ]
        )
        for ln in self.lines:
            w.writerow(
                [
                    self.contract_id,
                    ln.usage_id,
                    ln.time,
                    ln.mode,
                    ln.outcome,
                    ln.units,
                    ln.unit_price_minor,
                    ln.amount_minor,
                    self.currency,
                    format_minor(ln.amount_minor, self.currency),
                ]
            )
        return buf.getvalue()


def statement(
    contract: Contract,
    usage_records: Iterable[Mapping[str, Any]],
    period_start: datetime,
    period_end: datetime,
) -> Statement:
    """Build the statement of ``contract`` from ledger usage records (others are skipped).

    Records of other schemas or other contracts are ignored. Raises ``ValueError`` if a record of
    this contract is malformed, charges an amount other than ``units * unit_price_minor``, is
    released with a non-zero amount, is in another currency, or repeats a ``usage_id``.
    """
    start = require_utc(period_start, "period_start")
    end = require_utc(period_end, "period_end")
    if not start <= end:
        raise ValueError(f"period: expected period_start <= period_end, got {start} > {end}")
    cid = contract.contract_id
    currency = contract.terms.currency
    lines: list[StatementLine] = []
    seen: set[str] = set()
    for rec in usage_records:
        if rec.get("schema") != USAGE_SCHEMA or rec.get("contract_id") != cid:
            continue
        validate_record(dict(rec))
        t = parse_time(rec["time"], "time")
        if not start <= t < end:
            continue
        uid, units, price, amount = (
            rec["usage_id"],
            rec["units"],
            rec["unit_price_minor"],
            rec["amount_minor"],
        )
        if uid in seen:
            raise ValueError(f"usage {uid}: expected one record per usage_id, got a repeat")
        seen.add(uid)
        if rec["currency"] != currency:
            raise ValueError(f"usage {uid}: expected currency {currency}, got {rec['currency']}")
        want = charge_minor(units, price) if rec["outcome"] == "charged" else 0
        if amount != want:
            raise ValueError(f"usage {uid}: expected amount_minor {want}, got {amount}")
        lines.append(StatementLine(uid, rec["time"], rec["mode"], rec["outcome"], units, price, amount))
    lines.sort(key=lambda ln: (ln.time, ln.usage_id))
    units_by_mode = dict.fromkeys(MODES, 0)
    amount_by_mode = dict.fromkeys(MODES, 0)
    released = 0
    for ln in lines:
        if ln.outcome == "charged":
            units_by_mode[ln.mode] += ln.units
            amount_by_mode[ln.mode] += ln.amount_minor
        else:
            released += 1
    return Statement(
        contract_id=cid,
        offering_id=contract.offer.offering_id,
        provider_org=contract.offer.provider_org,
        consumer_org=contract.acceptance.consumer_org,
        currency=currency,
        period_start=start,
        period_end=end,
        lines=tuple(lines),
        units_by_mode=units_by_mode,
        amount_by_mode=amount_by_mode,
        total_units=sum(units_by_mode.values()),
        total_amount_minor=sum(amount_by_mode.values()),
        released_count=released,
    )


def reconcile(provider: Statement, consumer: Statement) -> None:
    """Return ``None`` if both statements list the same lines and totals; raise
    :class:`StatementMismatch` naming the usage ids only one side has or that differ."""
    if (provider.contract_id, provider.currency, provider.period_start, provider.period_end) != (
        consumer.contract_id,
        consumer.currency,
        consumer.period_start,
        consumer.period_end,
    ):
        raise StatementMismatch("statements cover different contracts, currencies or periods")
    a = {ln.usage_id: ln for ln in provider.lines}
    b = {ln.usage_id: ln for ln in consumer.lines}
    only_a = sorted(a.keys() - b.keys())
    only_b = sorted(b.keys() - a.keys())
    differ = sorted(k for k in a.keys() & b.keys() if a[k] != b[k])
    if only_a or only_b or differ:
        raise StatementMismatch(f"only provider: {only_a[:10]}, only consumer: {only_b[:10]}, differ: {differ[:10]}")
    if provider.total_amount_minor != consumer.total_amount_minor:  # pragma: no cover
        raise StatementMismatch("totals differ although lines agree")
