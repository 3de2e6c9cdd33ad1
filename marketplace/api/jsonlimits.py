"""Depth and size limits for JSON values that are stored from a request and served back later.

For: request fields such as an offering's input/output schemas, an agent's HE report, signed
records (``BoundedJson``/``BoundedRecord``), checked at input so that nothing stored can later make
a response fail to serialize for everyone (a schema nested 900 deep used to make the catalog
listing answer 500 to every caller). The check is iterative (no recursion on the value), refuses
non-finite numbers, and measures the compact serialized size. A failure is a pydantic
``ValueError``: the API answers 422 ``invalid`` naming the field.

Not for: whole request bodies (``max_request_bytes`` bounds those) or binary uploads.
"""

from __future__ import annotations

import json
from typing import Annotated, Any

from pydantic import BeforeValidator

__all__ = ["MAX_JSON_BYTES", "MAX_JSON_DEPTH", "BoundedJson", "BoundedRecord", "check_json"]

#: Deepest nesting of objects/arrays accepted in a stored JSON field (the top level is depth 1).
MAX_JSON_DEPTH = 32
#: Largest compact serialization (UTF-8 bytes) of a stored JSON field.
MAX_JSON_BYTES = 64 * 1024


def check_json(value: Any, *, max_depth: int = MAX_JSON_DEPTH, max_bytes: int = MAX_JSON_BYTES) -> Any:
    """Return ``value`` unchanged, or raise ValueError if it nests deeper than ``max_depth``,
    serializes to more than ``max_bytes`` or is not finite JSON."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        v, depth = stack.pop()
        if isinstance(v, dict | list):
            if depth > max_depth:
                raise ValueError(f"JSON nested deeper than {max_depth} levels")
            stack.extend((c, depth + 1) for c in (v.values() if isinstance(v, dict) else v))
    try:
        size = len(json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode())
    except (ValueError, TypeError) as e:
        raise ValueError("not finite JSON (NaN or Infinity)") from e
    if size > max_bytes:
        raise ValueError(f"JSON of {size} bytes; at most {max_bytes} bytes")
    return value


#: A JSON object stored and served back: at most MAX_JSON_DEPTH deep and MAX_JSON_BYTES big.
BoundedJson = Annotated[dict[str, Any], BeforeValidator(check_json)]
#: The same bounds for a signed record (offers, acceptances, contract events).
BoundedRecord = BoundedJson
