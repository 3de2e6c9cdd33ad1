"""Exactly-once metering of every use: reserve, compute, commit or release.

============================  ===================================================
module                        holds
============================  ===================================================
``metering.reserve``          :func:`begin`, :func:`commit`, :func:`release` and the
                              :func:`reserved` context manager around a computation
``metering.usage``            counters, usage rows and their ledger leaves on a locked
                              contract; releasing expired leases
``metering.idempotency``      idempotency keys, request digests, replays, receipts
============================  ===================================================

Callers use the names below (``from marketplace.services import metering``). Not for: policy
(:mod:`contracts.policy`), prices and statements (:mod:`contracts.metering`).
"""

from __future__ import annotations

from marketplace.services.metering.idempotency import (
    StoredResult,
    check_idempotency_key,
    key_digest,
    receipt_for,
    receipt_header,
    request_digest,
)
from marketplace.services.metering.reserve import (
    INLINE_RESULT_BYTES,
    LEASE_SECONDS,
    Charged,
    Reservation,
    begin,
    commit,
    release,
)
from marketplace.services.metering.scope import Use, reserved
from marketplace.services.metering.usage import sweep_expired

__all__ = [
    "INLINE_RESULT_BYTES",
    "LEASE_SECONDS",
    "Charged",
    "Reservation",
    "StoredResult",
    "Use",
    "begin",
    "check_idempotency_key",
    "commit",
    "key_digest",
    "receipt_for",
    "receipt_header",
    "release",
    "request_digest",
    "reserved",
    "sweep_expired",
]
