from __future__ import annotations

import copy
import json
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from contracts.errors import SchemaError
from contracts.terms import Terms, currency_exponent, format_minor
from tests.contracts.conftest import standard_terms
from tests.contracts.strategies import terms, utc_datetimes


@given(terms())
def test_round_trip_through_json(t):
    d = t.to_dict()
    again = Terms.from_dict(json.loads(json.dumps(d)))
    assert again == t
    assert again.to_dict() == d


def _mutated(path, value):
    d = standard_terms().to_dict()
    target = d
    for p in path[:-1]:
        target = target[p]
    target[path[-1]] = value
    return d


@pytest.mark.parametrize(
    ("path", "value", "expected"),
    [
        (("schema",), "som.terms/v2", "som.terms/v1"),
        (("quota_units",), -1, "integer"),
        (("quota_units",), 1.5, "integer"),
        (("quota_units",), True, "integer"),
        (("quota_units",), 2**53, "integer"),
        (("rate", "units"), 0, "integer in [1"),
        (("modes",), ["remote_job", "he_inference"], "sorted list"),
        (("modes",), ["he_inference", "he_inference"], "sorted list"),
        (("modes",), ["batch"], "sorted list"),
        (("modes",), [], "at least one mode"),
        (("valid_from",), "2026-01-01T00:00:00Z", "RFC 3339"),
        (("valid_from",), "2026-01-01T00:00:00.000000+00:00", "RFC 3339"),
        (("valid_until",), "2025-01-01T00:00:00.000000Z", "valid_from < valid_until"),
        (("price", "currency"), "eur", "[A-Z]{3}"),
        (("price", "unit_price_minor"), "5", "integer"),
        (("job_limits", "allowed_kinds"), ["train"], "sorted list"),
        (("job_limits", "memory_mb"), 0, "integer in [1"),
    ],
)
def test_from_dict_names_field_expected_and_got(path, value, expected):
    with pytest.raises(SchemaError) as e:
        Terms.from_dict(_mutated(path, value))
    msg = str(e.value)
    assert path[-1] in msg
    assert expected in msg
    assert "got" in msg


def test_from_dict_missing_and_extra_fields():
    d = standard_terms().to_dict()
    missing = copy.deepcopy(d)
    del missing["max_batch"]
    with pytest.raises(SchemaError, match="missing field.*max_batch"):
        Terms.from_dict(missing)
    extra = copy.deepcopy(d)
    extra["rate"]["burst"] = 3
    with pytest.raises(SchemaError, match="unexpected field.*burst"):
        Terms.from_dict(extra)
    with pytest.raises(SchemaError, match="JSON object"):
        Terms.from_dict([])


def test_constructor_refuses_bad_values():
    with pytest.raises(ValueError, match="naive"):
        standard_terms(valid_from=datetime(2026, 1, 1))
    with pytest.raises(ValueError, match="offset"):
        standard_terms(valid_from=datetime(2026, 1, 1, tzinfo=timezone(timedelta(hours=2))))
    with pytest.raises(ValueError, match="valid_from < valid_until"):
        standard_terms(valid_until=datetime(2026, 1, 1, tzinfo=UTC))
    with pytest.raises(ValueError, match="subset"):
        standard_terms(modes={"training"})
    with pytest.raises(ValueError, match="non-empty"):
        standard_terms(modes=set())
    with pytest.raises(TypeError, match="collection"):
        standard_terms(modes="he_inference")
    with pytest.raises(ValueError, match="ISO 4217"):
        standard_terms(currency="euro")
    with pytest.raises(ValueError, match="max_batch"):
        standard_terms(max_batch=0)


def test_money_is_exact_decimal():
    assert format_minor(1234, "EUR") == "12.34"
    assert format_minor(5, "EUR") == "0.05"
    assert format_minor(1234, "JPY") == "1234"
    assert format_minor(1234, "KWD") == "1.234"
    assert currency_exponent("CHF") == 2
    t = standard_terms(unit_price_minor=7, currency="KWD")
    assert t.unit_price() == Decimal("0.007")
    assert t.amount_minor(3) == 21


@given(terms(), st.integers(0, 10**6))
def test_amount_is_units_times_price(t, units):
    assert t.amount_minor(units) == units * t.unit_price_minor
    assert Decimal(t.amount_minor(units)).scaleb(-currency_exponent(t.currency)) == (t.unit_price() * units)


@given(terms(), utc_datetimes)
def test_window_index_brackets_now(t, now):
    i = t.window_index(now)
    start = t.valid_from + timedelta(seconds=i * t.rate_window_seconds)
    assert start <= now < start + timedelta(seconds=t.rate_window_seconds)


@given(terms(), utc_datetimes)
def test_validity_window_is_half_open(t, now):
    assert t.is_valid_at(now) == (t.valid_from <= now < t.valid_until)
    assert t.is_valid_at(t.valid_from)
    assert not t.is_valid_at(t.valid_until)
