"""RFC 8785 (JSON Canonicalization Scheme) for ledger leaves, offers and acceptances.

For: turning a JSON-compatible value into the one byte string that is hashed and signed.
Not for: parsing JSON (use :mod:`json`) or for values that are not plain JSON (no NaN, no
bytes, no datetimes: convert those first).

We use Trail of Bits' ``rfc8785`` package rather than code of our own: number serialization
(ECMAScript's Number::toString) is the subtle part of the RFC and it is already done right there.
"""

from __future__ import annotations

import hashlib
from typing import Any

import rfc8785

__all__ = ["canonicalize", "canonical_digest"]


def canonicalize(value: Any) -> bytes:
    """Return the RFC 8785 canonical UTF-8 encoding of ``value``.

    Raises ``ValueError`` for values JSON cannot carry canonically (NaN, infinities, integers
    beyond IEEE 754 double precision, non-string keys, unsupported types).
    """
    try:
        return rfc8785.dumps(value)
    except (rfc8785.CanonicalizationError, TypeError) as e:
        raise ValueError(f"value cannot be canonicalized as RFC 8785 JSON: {e}") from e


def canonical_digest(value: Any) -> str:
    """``sha256:<hex>`` of the canonical encoding of ``value``."""
    return "sha256:" + hashlib.sha256(canonicalize(value)).hexdigest()
