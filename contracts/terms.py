"""Contract terms: what a consumer may do with an offering, how much, how fast, when, at what price.

For: the typed, versioned (``som.terms/v1``) value that an offer signs and that
:func:`contracts.policy.decide` and :mod:`contracts.compliance` enforce.
Not for: signing (see :mod:`contracts.offer`), usage state (see :mod:`contracts.policy`) or
money formatting beyond :func:`format_minor`.

All computation modes (``he_inference``, ``remote_job``, ``gateway``: plaintext rows answered
synchronously, the compute site sees the inputs) draw on one quota of *units*. Prices are
integers in the currency's minor unit (cents for EUR); derived amounts use :class:`decimal.Decimal`,
never float. The validity window is half-open: ``valid_from <= t < valid_until``.

Wire form (``to_dict``), every key required, lists sorted and unique::

    {"schema": "som.terms/v1", "modes": ["he_inference", "remote_job"], "quota_units": 10000,
     "rate": {"units": 100, "window_seconds": 60},
     "valid_from": "2026-01-01T00:00:00.000000Z", "valid_until": "2027-01-01T00:00:00.000000Z",
     "price": {"unit_price_minor": 5, "currency": "EUR"}, "max_batch": 64,
     "job_limits": {"allowed_kinds": ["evaluate", "predict"], "cpu_seconds": 600,
                    "memory_mb": 2048, "wall_seconds": 900}}
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import Any, ClassVar

from contracts._validate import (
    MAX_JSON_INT,
    describe,
    expect_keys,
    format_time,
    get_int,
    get_str,
    get_time,
    require_utc,
)
from contracts.errors import SchemaError

__all__ = [
    "JOB_KINDS",
    "MODES",
    "TERMS_SCHEMA",
    "JobLimits",
    "Terms",
    "currency_exponent",
    "format_minor",
]

TERMS_SCHEMA = "som.terms/v1"
MODES: tuple[str, ...] = ("federated", "gateway", "he_inference", "remote_job")
JOB_KINDS: tuple[str, ...] = ("custom", "evaluate", "predict")

CURRENCY_RE = re.compile(r"[A-Z]{3}")
# ISO 4217 minor-unit exponents that are not 2 (the common case).
_EXPONENTS = {
    **dict.fromkeys(
        [
            "BIF",
            "CLP",
            "DJF",
            "GNF",
            "ISK",
            "JPY",
            "KMF",
            "KRW",
            "PYG",
            "RWF",
            "UGX",
            "UYI",
            "VND",
            "VUV",
            "XAF",
            "XOF",
            "XPF",
        ],
        0,
    ),
    **dict.fromkeys(["BHD", "IQD", "JOD", "KWD", "LYD", "OMR", "TND"], 3),
    **dict.fromkeys(["CLF", "UYW"], 4),
}


def currency_exponent(currency: str) -> int:
    """Digits after the decimal point of ``currency``'s minor unit (ISO 4217; 2 by default)."""
    if not isinstance(currency, str) or not CURRENCY_RE.fullmatch(currency):
        raise ValueError(f"currency: expected an ISO 4217 code like 'EUR', got {describe(currency)}")
    return _EXPONENTS.get(currency, 2)


def format_minor(amount_minor: int, currency: str) -> str:
    """``1234, "EUR" -> "12.34"``; exact (Decimal), never float."""
    if type(amount_minor) is not int:
        raise TypeError(f"amount_minor: expected int, got {describe(amount_minor)}")
    exp = currency_exponent(currency)
    return str(Decimal(amount_minor).scaleb(-exp).quantize(Decimal(1).scaleb(-exp)))


def _check_int(name: str, value: Any, minimum: int) -> None:
    if type(value) is not int or not minimum <= value <= MAX_JSON_INT:
        raise ValueError(f"{name}: expected an integer in [{minimum}, 2**53-1], got {describe(value)}")


def _sorted_subset(name: str, values: Iterable[str], allowed: tuple[str, ...]) -> frozenset[str]:
    if isinstance(values, str):
        raise TypeError(f"{name}: expected a collection of strings, got {describe(values)}")
    got = frozenset(values)
    bad = sorted(str(v) for v in got - set(allowed))
    if bad:
        raise ValueError(f"{name}: expected a subset of {list(allowed)}, got unknown {bad}")
    return got


def _list_field(d: Mapping[str, Any], key: str, where: str, allowed: tuple[str, ...]) -> frozenset[str]:
    v = d[key]
    if not isinstance(v, list) or not all(type(x) is str and x in allowed for x in v) or v != sorted(set(v)):
        raise SchemaError(
            f"{where}.{key}: expected a sorted list of distinct values from {list(allowed)}, got {describe(v)}"
        )
    return frozenset(v)


@dataclass(frozen=True)
class JobLimits:
    """Limits for remote-execution jobs: which kinds, and the sandbox's CPU, memory and wall time."""

    allowed_kinds: frozenset[str]
    cpu_seconds: int
    memory_mb: int
    wall_seconds: int

    def __post_init__(self) -> None:
        object.__setattr__(self, "allowed_kinds", _sorted_subset("allowed_kinds", self.allowed_kinds, JOB_KINDS))
        _check_int("cpu_seconds", self.cpu_seconds, 1)
        _check_int("memory_mb", self.memory_mb, 1)
        _check_int("wall_seconds", self.wall_seconds, 1)

    def to_dict(self) -> dict[str, Any]:
        return {
            "allowed_kinds": sorted(self.allowed_kinds),
            "cpu_seconds": self.cpu_seconds,
            "memory_mb": self.memory_mb,
            "wall_seconds": self.wall_seconds,
        }

    @classmethod
    def from_dict(cls, data: Any, *, where: str = "job_limits") -> JobLimits:
        d = expect_keys(data, where, ("allowed_kinds", "cpu_seconds", "memory_mb", "wall_seconds"))
        return cls(
            allowed_kinds=_list_field(d, "allowed_kinds", where, JOB_KINDS),
            cpu_seconds=get_int(d, "cpu_seconds", where, minimum=1),
            memory_mb=get_int(d, "memory_mb", where, minimum=1),
            wall_seconds=get_int(d, "wall_seconds", where, minimum=1),
        )


@dataclass(frozen=True)
class Terms:
    """Immutable contract terms. Construction validates every field (``ValueError``/``TypeError``).

    ``quota_units`` may be 0 (a contract that allows nothing, e.g. after an amendment);
    ``unit_price_minor`` may be 0 (free sharing). ``valid_from < valid_until``, both aware UTC.
    """

    schema: ClassVar[str] = TERMS_SCHEMA

    modes: frozenset[str]
    quota_units: int
    rate_units: int
    rate_window_seconds: int
    valid_from: datetime
    valid_until: datetime
    unit_price_minor: int
    currency: str
    max_batch: int
    job_limits: JobLimits = field(default_factory=lambda: JobLimits(frozenset({"predict", "evaluate"}), 600, 2048, 900))

    def __post_init__(self) -> None:
        modes = _sorted_subset("modes", self.modes, MODES)
        if not modes:
            raise ValueError(f"modes: expected a non-empty subset of {list(MODES)}, got none")
        object.__setattr__(self, "modes", modes)
        _check_int("quota_units", self.quota_units, 0)
        _check_int("rate_units", self.rate_units, 1)
        _check_int("rate_window_seconds", self.rate_window_seconds, 1)
        _check_int("unit_price_minor", self.unit_price_minor, 0)
        _check_int("max_batch", self.max_batch, 1)
        currency_exponent(self.currency)
        vf = require_utc(self.valid_from, "valid_from")
        vu = require_utc(self.valid_until, "valid_until")
        if not vf < vu:
            raise ValueError(f"validity: expected valid_from < valid_until, got {vf} >= {vu}")
        object.__setattr__(self, "valid_from", vf)
        object.__setattr__(self, "valid_until", vu)
        if not isinstance(self.job_limits, JobLimits):
            raise TypeError(f"job_limits: expected JobLimits, got {describe(self.job_limits)}")

    # -- derived values -------------------------------------------------------------------

    def amount_minor(self, units: int) -> int:
        """Charge for ``units`` in minor units: ``units * unit_price_minor`` (exact integers)."""
        _check_int("units", units, 0)
        return units * self.unit_price_minor

    def unit_price(self) -> Decimal:
        """The unit price in major units, exactly (``Decimal``)."""
        return Decimal(self.unit_price_minor).scaleb(-currency_exponent(self.currency))

    def is_valid_at(self, now: datetime) -> bool:
        """Whether ``now`` lies in the half-open validity window (not a security check)."""
        t = require_utc(now, "now")
        return self.valid_from <= t < self.valid_until

    def window_index(self, now: datetime) -> int:
        """Fixed rate window of ``now``: ``floor((now - valid_from) / window)``; negative before."""
        t = require_utc(now, "now")
        delta = t - self.valid_from
        # Integer microseconds: exact, no float.
        micros = (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds
        return micros // (self.rate_window_seconds * 1_000_000)

    # -- wire form ------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": TERMS_SCHEMA,
            "modes": sorted(self.modes),
            "quota_units": self.quota_units,
            "rate": {"units": self.rate_units, "window_seconds": self.rate_window_seconds},
            "valid_from": format_time(self.valid_from),
            "valid_until": format_time(self.valid_until),
            "price": {"unit_price_minor": self.unit_price_minor, "currency": self.currency},
            "max_batch": self.max_batch,
            "job_limits": self.job_limits.to_dict(),
        }

    @classmethod
    def from_dict(cls, data: Any, *, where: str = "terms") -> Terms:
        """Parse the wire form strictly; raises :class:`SchemaError` naming field, expected, got."""
        d = expect_keys(
            data,
            where,
            (
                "schema",
                "modes",
                "quota_units",
                "rate",
                "valid_from",
                "valid_until",
                "price",
                "max_batch",
                "job_limits",
            ),
        )
        get_str(d, "schema", where, choices=(TERMS_SCHEMA,))
        modes = _list_field(d, "modes", where, MODES)
        if not modes:
            raise SchemaError(f"{where}.modes: expected at least one mode, got []")
        rate = expect_keys(d["rate"], f"{where}.rate", ("units", "window_seconds"))
        price = expect_keys(d["price"], f"{where}.price", ("unit_price_minor", "currency"))
        vf = get_time(d, "valid_from", where)
        vu = get_time(d, "valid_until", where)
        if not vf < vu:
            raise SchemaError(
                f"{where}: expected valid_from < valid_until, got {d['valid_from']} >= {d['valid_until']}"
            )
        return cls(
            modes=modes,
            quota_units=get_int(d, "quota_units", where),
            rate_units=get_int(rate, "units", f"{where}.rate", minimum=1),
            rate_window_seconds=get_int(rate, "window_seconds", f"{where}.rate", minimum=1),
            valid_from=vf,
            valid_until=vu,
            unit_price_minor=get_int(price, "unit_price_minor", f"{where}.price"),
            currency=get_str(price, "currency", f"{where}.price", pattern=CURRENCY_RE),
            max_batch=get_int(d, "max_batch", where, minimum=1),
            job_limits=JobLimits.from_dict(d["job_limits"], where=f"{where}.job_limits"),
        )
