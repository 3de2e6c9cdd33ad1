"""Metering's idempotency keys, request digests and receipts.

For: checking an ``Idempotency-Key`` header, the digests that are stored and ledgered instead of
the key and the request (``sha256:<hex>``), the replayed first answer (:class:`StoredResult`),
the ``X-Som-Receipt`` header and the receipt of a finished use. Not for: reserving and charging
(:mod:`marketplace.services.metering.reserve`).

Idempotency keys are scoped to the calling organisation and stored only as a SHA-256 digest,
together with the request digest: same key + same request replays, same key + another request
is 422, same key still in flight (lease not expired) is 409.
"""

from __future__ import annotations

import base64
import hashlib
import re
from dataclasses import dataclass
from typing import Any

from crypto.canonical import canonicalize
from marketplace.db.models_contracts import UsageRow, UsageState
from marketplace.errors import Conflict, Invalid, NotFound
from marketplace.runtime import Runtime
from marketplace.services.contracts import ledger_receipt
from marketplace.services.identity import Principal

__all__ = [
    "StoredResult",
    "check_idempotency_key",
    "check_request_digest",
    "key_digest",
    "receipt_for",
    "receipt_header",
    "request_digest",
]

_KEY_RE = re.compile(r"[\x21-\x7e]{1,255}")
_DIGEST_RE = re.compile(r"sha256:[0-9a-f]{64}")


@dataclass(frozen=True)
class StoredResult:
    """The first answer to an idempotent request, replayed: result bytes and the receipt."""

    body: bytes
    media_type: str
    receipt: dict[str, Any]
    usage_id: str


def check_idempotency_key(value: str | None) -> str:
    """The ``Idempotency-Key`` header value, or :class:`Invalid` (422) if missing or malformed."""
    if value is None or value == "":
        raise Invalid("the Idempotency-Key header is required for metered requests (e.g. a UUID)")
    if not _KEY_RE.fullmatch(value):
        raise Invalid("Idempotency-Key must be 1..255 printable ASCII characters without spaces")
    return value


def key_digest(key: str) -> str:
    """``sha256:<hex>`` of an idempotency key (what is stored and ledgered, never the key)."""
    return "sha256:" + hashlib.sha256(key.encode()).hexdigest()


def request_digest(*parts: bytes | str) -> str:
    """``sha256:<hex>`` over length-prefixed ``parts`` (route, parameters, body bytes...)."""
    h = hashlib.sha256(b"som.request/v1")
    for part in parts:
        b = part.encode() if isinstance(part, str) else bytes(part)
        h.update(len(b).to_bytes(8, "big"))
        h.update(b)
    return "sha256:" + h.hexdigest()


def receipt_header(receipt: dict[str, Any]) -> str:
    """The ``X-Som-Receipt`` header value: base64url of the receipt's RFC 8785 canonical JSON."""
    return base64.urlsafe_b64encode(canonicalize(receipt)).decode()


def check_request_digest(value: str) -> None:
    """:class:`Invalid` unless ``value`` is ``sha256:<64 hex>`` (what :func:`request_digest` makes)."""
    if not isinstance(value, str) or not _DIGEST_RE.fullmatch(value):
        raise Invalid(f"request_digest: expected 'sha256:<64 hex>', got {value!r}")


def receipt_for(rt: Runtime, p: Principal, usage_id: str) -> dict[str, Any]:
    """The receipt of a finished use, for its consumer, its provider or a compliance officer."""
    with rt.tx() as s:
        u = s.get(UsageRow, usage_id)
        if u is None or not (p.org_id in (u.consumer_org_id, u.provider_org_id) or p.has("compliance")):
            raise NotFound(f"usage {usage_id} not found", denied=usage_id)
        if u.state == UsageState.RESERVED:
            raise Conflict(f"usage {usage_id} is still in progress; no receipt yet")
        index = u.ledger_index
        out = {"usage_id": u.id, "contract_id": u.contract_id, "outcome": u.state}
    return {**out, "receipt": ledger_receipt(rt, index)}
