"""RFC 8785 (JSON Canonicalization Scheme) for ledger leaves, offers and acceptances.

For: turning a JSON-compatible value into the one byte string that is hashed and signed.
Not for: parsing JSON (use :mod:`json`) or for values that are not plain JSON (no NaN, no
bytes, no datetimes: convert those first).

We use Trail of Bits' ``rfc8785`` package rather than code of our own: number serialization
(ECMAScript's Number::toString) is the subtle part of the RFC and it is already done right there.

Fast path: ledger leaves are flat records of strings and integers, for which RFC 8785 output is
exactly ``json.dumps(sort_keys=True, separators=(",", ":"), ensure_ascii=False)`` (same escapes,
and code-point key order equals UTF-16 order for keys below U+D800). Values with floats, large
integers, lone surrogates or other keys take the ``rfc8785`` path. ``tests/crypto/test_canonical.py``
checks the two agree on arbitrary JSON values.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import rfc8785

__all__ = ["canonicalize", "canonical_digest"]


def canonicalize(value: Any) -> bytes:
    """Return the RFC 8785 canonical UTF-8 encoding of ``value``.

    Raises ``ValueError`` for values JSON cannot carry canonically (NaN, infinities, integers
    beyond IEEE 754 double precision, non-string keys, unsupported types).
    """
    if _fast_ok(value, 0):
        return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    try:
        return rfc8785.dumps(value)
    except (rfc8785.CanonicalizationError, TypeError) as e:
        raise ValueError(f"value cannot be canonicalized as RFC 8785 JSON: {e}") from e


def canonical_digest(value: Any) -> str:
    """``sha256:<hex>`` of the canonical encoding of ``value``."""
    return "sha256:" + hashlib.sha256(canonicalize(value)).hexdigest()


_MAX_SAFE = 2**53 - 1


def _str_ok(text: str) -> bool:
    # No surrogate code points (lone surrogates cannot be encoded as UTF-8).
    return text.isascii() or not any(0xD800 <= ord(c) <= 0xDFFF for c in text)


def _fast_ok(value: Any, depth: int) -> bool:
    """True when ``json.dumps`` gives the RFC 8785 bytes for ``value`` (no floats and the like)."""
    if depth > 64:
        return False
    t = type(value)
    if t is str:
        return _str_ok(value)
    if t is int:
        return bool(-_MAX_SAFE <= value <= _MAX_SAFE)
    if value is None or t is bool:
        return True
    if t is dict:
        for k, v in value.items():
            if type(k) is not str or not (k.isascii() or all(ord(c) < 0xD800 for c in k)):
                return False
            if not _fast_ok(v, depth + 1):
                return False
        return True
    if t is list or t is tuple:
        return all(_fast_ok(v, depth + 1) for v in value)
    return False
