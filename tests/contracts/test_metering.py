from __future__ import annotations

import csv
import io
from datetime import timedelta
from decimal import Decimal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from contracts.errors import StatementMismatch
from contracts.metering import charge_minor, reconcile, statement
from contracts.records import usage_record
from contracts.terms import MODES
from tests.contracts.conftest import standard_contract, standard_terms
from tests.contracts.strategies import DIGEST, T0, currencies

END = T0 + timedelta(days=30)

uses = st.lists(
    st.tuples(
        st.sampled_from(MODES),
        st.integers(1, 10_000),
        st.sampled_from(["charged", "released"]),
        st.integers(0, 30 * 86_400 - 1),
    ),
    max_size=30,
)


def _records(contract, items):
    return [
        usage_record(
            contract,
            usage_id=f"u{i}",
            mode=mode,
            units=units,
            outcome=outcome,
            request_digest=DIGEST,
            idempotency_key_digest=DIGEST,
            time=T0 + timedelta(seconds=s),
        )
        for i, (mode, units, outcome, s) in enumerate(items)
    ]


def _contract(price, currency):
    return standard_contract(standard_terms(unit_price_minor=price, currency=currency))


@settings(max_examples=50, deadline=None)
@given(uses, st.integers(0, 10**6), currencies, st.randoms(use_true_random=False))
def test_statement_totals_and_views_reconcile(items, price, currency, rnd):
    contract = _contract(price, currency)
    records = _records(contract, items)
    provider = statement(contract, records, T0, END)
    charged = [r for r in records if r["outcome"] == "charged"]
    units = sum(r["units"] for r in charged)
    assert provider.total_units == units
    assert provider.total_amount_minor == units * price  # sum of charges == units * price
    assert sum(provider.units_by_mode.values()) == provider.total_units
    assert sum(provider.amount_by_mode.values()) == provider.total_amount_minor
    assert provider.released_count == len(records) - len(charged)
    # The consumer holds the same records (its receipts), in another order, plus noise.
    shuffled = list(records)
    rnd.shuffle(shuffled)
    other = standard_contract(consumer_org="someone-else")
    noise = _records(other, [("he_inference", 5, "charged", 1)])
    consumer = statement(contract, [*noise, *shuffled], T0, END)
    reconcile(provider, consumer)
    assert consumer == provider
    # The CSV adds up to the same total, to the cent.
    rows = list(csv.DictReader(io.StringIO(provider.to_csv())))
    assert len(rows) == len(records)
    assert sum(int(r["amount_minor"]) for r in rows) == provider.total_amount_minor
    assert sum((Decimal(r["amount"]) for r in rows), Decimal(0)) == Decimal(provider.to_dict()["total_amount"])


@settings(max_examples=50, deadline=None)
@given(uses, st.integers(0, 30 * 86_400))
def test_statements_are_additive_over_periods(items, cut_s):
    contract = _contract(7, "EUR")
    records = _records(contract, items)
    cut = T0 + timedelta(seconds=cut_s)
    a = statement(contract, records, T0, cut)
    b = statement(contract, records, cut, END)
    whole = statement(contract, records, T0, END)
    assert a.total_units + b.total_units == whole.total_units
    assert a.total_amount_minor + b.total_amount_minor == whole.total_amount_minor
    assert a.lines + b.lines == whole.lines
    for m in MODES:
        assert a.amount_by_mode[m] + b.amount_by_mode[m] == whole.amount_by_mode[m]


def test_reconcile_names_the_missing_line(contract):
    records = _records(contract, [("he_inference", 2, "charged", 5), ("remote_job", 3, "charged", 9)])
    full = statement(contract, records, T0, END)
    partial = statement(contract, records[:1], T0, END)
    with pytest.raises(StatementMismatch, match="u1"):
        reconcile(full, partial)
    with pytest.raises(StatementMismatch, match="periods"):
        reconcile(full, statement(contract, records, T0, END - timedelta(1)))


def test_statement_refuses_inconsistent_records(contract):
    good = _records(contract, [("he_inference", 2, "charged", 5)])[0]
    with pytest.raises(ValueError, match="amount_minor"):
        statement(contract, [{**good, "amount_minor": 11}], T0, END)
    with pytest.raises(ValueError, match="amount_minor"):
        statement(contract, [{**good, "outcome": "released"}], T0, END)
    with pytest.raises(ValueError, match="currency"):
        statement(contract, [{**good, "currency": "USD"}], T0, END)
    with pytest.raises(ValueError, match="repeat"):
        statement(contract, [good, good], T0, END)
    with pytest.raises(ValueError, match="period"):
        statement(contract, [good], END, T0)


def test_statement_dict_and_money_format():
    contract = _contract(1234, "KWD")
    s = statement(contract, _records(contract, [("remote_job", 3, "charged", 0)]), T0, END)
    d = s.to_dict()
    assert d["total_amount_minor"] == 3702
    assert d["total_amount"] == "3.702"
    assert d["lines"][0]["time"] == "2026-01-01T00:00:00.000000Z"
    assert d["period_end"] == "2026-01-31T00:00:00.000000Z"


def test_charge_minor():
    assert charge_minor(3, 5) == 15
    assert charge_minor(2**40, 10**6) == 2**40 * 10**6  # exact, no float
    with pytest.raises(ValueError):
        charge_minor(-1, 5)
    with pytest.raises(ValueError):
        charge_minor(1, 0.5)
