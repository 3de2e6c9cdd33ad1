"""Internal helpers: strict field readers for plain-JSON dicts and the one time format.

For: ``from_dict``/``parse_record`` code in this package, so every schema error reads the same
way ("<where>.<field>: expected ..., got ...").
Not for: use outside ``contracts`` (private; the names may change).

Time on the wire is always RFC 3339 UTC with exactly six fractional digits and ``Z``
(``2026-01-02T03:04:05.000000Z``). One format means ``to_dict(from_dict(d)) == d`` exactly, which
signed records need (the signature covers the string), and it sorts lexicographically in time order.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

from contracts.errors import SchemaError

__all__ = [
    "MAX_JSON_INT",
    "describe",
    "expect_keys",
    "format_time",
    "get_digest",
    "get_int",
    "get_opt_str",
    "get_str",
    "get_time",
    "parse_time",
    "require_utc",
]

#: Largest integer RFC 8785 (IEEE 754 doubles) carries exactly.
MAX_JSON_INT = 2**53 - 1
MAX_ID_LEN = 256

TIME_RE = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z")
DIGEST_RE = re.compile(r"sha256:[0-9a-f]{64}")
_ZERO = timedelta(0)


def describe(value: Any) -> str:
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{text} ({type(value).__name__})"


def expect_keys(d: Any, where: str, required: Iterable[str], optional: Iterable[str] = ()) -> Mapping[str, Any]:
    if not isinstance(d, Mapping):
        raise SchemaError(f"{where}: expected a JSON object, got {describe(d)}")
    req = set(required)
    allowed = req | set(optional)
    missing = sorted(req - d.keys())
    if missing:
        raise SchemaError(f"{where}: missing field(s) {missing}, got fields {sorted(d.keys())}")
    extra = sorted(str(k) for k in d.keys() - allowed)
    if extra:
        raise SchemaError(f"{where}: unexpected field(s) {extra}, expected only {sorted(allowed)}")
    return d


def get_int(d: Mapping[str, Any], key: str, where: str, *, minimum: int = 0) -> int:
    v = d[key]
    if type(v) is not int or not minimum <= v <= MAX_JSON_INT:
        raise SchemaError(f"{where}.{key}: expected an integer in [{minimum}, 2**53-1], got {describe(v)}")
    return v


def get_str(
    d: Mapping[str, Any],
    key: str,
    where: str,
    *,
    choices: Iterable[str] | None = None,
    pattern: re.Pattern[str] | None = None,
) -> str:
    v = d[key]
    if choices is not None:
        opts = tuple(choices)
        if v not in opts or type(v) is not str:
            raise SchemaError(f"{where}.{key}: expected one of {list(opts)}, got {describe(v)}")
        return v
    if type(v) is not str:
        raise SchemaError(f"{where}.{key}: expected a string, got {describe(v)}")
    if pattern is not None:
        if not pattern.fullmatch(v):
            raise SchemaError(f"{where}.{key}: expected /{pattern.pattern}/, got {describe(v)}")
    elif not (0 < len(v) <= MAX_ID_LEN and v.isprintable()):
        raise SchemaError(
            f"{where}.{key}: expected a non-empty printable string of at most {MAX_ID_LEN} "
            f"characters, got {describe(v)}"
        )
    return v


def get_opt_str(d: Mapping[str, Any], key: str, where: str) -> str | None:
    if d[key] is None:
        return None
    return get_str(d, key, where)


def get_digest(d: Mapping[str, Any], key: str, where: str) -> str:
    return get_str(d, key, where, pattern=DIGEST_RE)


def parse_time(text: Any, where: str) -> datetime:
    if type(text) is not str or not TIME_RE.fullmatch(text):
        raise SchemaError(
            f"{where}: expected RFC 3339 UTC time like '2026-01-02T03:04:05.000000Z', got {describe(text)}"
        )
    try:
        return datetime.fromisoformat(text)
    except ValueError as e:
        raise SchemaError(f"{where}: not a valid date/time, got {describe(text)}") from e


def get_time(d: Mapping[str, Any], key: str, where: str) -> datetime:
    return parse_time(d[key], f"{where}.{key}")


def require_utc(value: Any, name: str) -> datetime:
    """Return ``value`` as an aware UTC datetime; refuse naive or non-UTC ones."""
    if not isinstance(value, datetime):
        raise TypeError(f"{name}: expected a datetime, got {describe(value)}")
    off = value.utcoffset()
    if off is None:
        raise ValueError(f"{name}: expected an aware UTC datetime, got a naive one ({value})")
    if off != _ZERO:
        raise ValueError(f"{name}: expected UTC (offset 0), got offset {off}")
    return value if value.tzinfo is UTC else value.replace(tzinfo=UTC)


def format_time(value: datetime) -> str:
    dt = require_utc(value, "time")
    return (
        f"{dt.year:04d}-{dt.month:02d}-{dt.day:02d}T{dt.hour:02d}:{dt.minute:02d}:{dt.second:02d}.{dt.microsecond:06d}Z"
    )


def now_utc() -> datetime:
    return datetime.now(UTC)
