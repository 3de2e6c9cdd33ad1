"""Idempotent retries for the SDK's charged requests (HE inference, job submission).

For: sending one logical request, with one ``Idempotency-Key`` chosen before the first attempt,
as many times as it takes (bounded) when the answer is lost or the server is busy: transport
errors and timeouts, ``503`` (overload shed, a worker or agent away), and ``409`` with
``Retry-After`` (the same key still in progress on the server). The server replays the first
answer for a key it already charged (``marketplace.services.metering.begin``), so a retry after a
lost response returns the stored result and is never a second charge.
Not for: requests without an idempotency key (a retried plain POST could act twice), or errors
that a retry cannot fix (4xx other than the above, a 503 that says the site cannot do it at all).

Backoff: exponential with full jitter (``uniform(0, min(max_delay, base_delay * 2**n))``); a
``Retry-After`` header, when present, is honoured instead (capped at ``max_delay``).
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass

import httpx

__all__ = ["DEFAULT_RETRY", "NO_RETRY", "RetryPolicy", "retry_after_seconds", "send_with_retries"]

#: 503 reasons that no retry can change (the site cannot run this kind of work at all).
PERMANENT_503 = frozenset({"jail_unavailable"})
PERMANENT_CODES = frozenset({"ledger_integrity"})


@dataclass(frozen=True)
class RetryPolicy:
    """``attempts`` in all (1 = no retry); delays in seconds."""

    attempts: int = 5
    base_delay: float = 0.2
    max_delay: float = 5.0

    def delay(self, attempt: int, retry_after: float | None, rng: Callable[[], float] = random.random) -> float:
        """Seconds to wait before attempt ``attempt + 1`` (``attempt`` counts from 0)."""
        if retry_after is not None:
            return min(self.max_delay, max(0.0, retry_after)) + rng() * self.base_delay
        return float(rng() * min(self.max_delay, self.base_delay * (2**attempt)))


DEFAULT_RETRY = RetryPolicy()
NO_RETRY = RetryPolicy(attempts=1)


def retry_after_seconds(headers: httpx.Headers | dict[str, str]) -> float | None:
    """The ``Retry-After`` header in seconds (delta-seconds form only), or None."""
    value = headers.get("retry-after") or headers.get("Retry-After")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None  # an HTTP date: fall back to the exponential backoff


def _retryable(r: httpx.Response) -> bool:
    if r.status_code == 503:
        try:
            err = r.json().get("error", {})
        except ValueError:
            return True
        return err.get("reason") not in PERMANENT_503 and err.get("code") not in PERMANENT_CODES
    return r.status_code == 409 and retry_after_seconds(r.headers) is not None


def send_with_retries(
    send: Callable[[], httpx.Response],
    policy: RetryPolicy = DEFAULT_RETRY,
    *,
    sleep: Callable[[float], None] = time.sleep,
) -> httpx.Response:
    """``send()`` until it answers something final, at most ``policy.attempts`` times.

    Returns the last response (possibly an error response: the caller raises it); re-raises the
    last transport error if every attempt failed that way. ``send`` must carry the same
    ``Idempotency-Key`` on every call.
    """
    attempts = max(1, policy.attempts)
    for attempt in range(attempts):
        last = attempt == attempts - 1
        try:
            r = send()
        except httpx.TransportError:  # timeouts, refused or reset connections, lost responses
            if last:
                raise
            sleep(policy.delay(attempt, None))
            continue
        if last or not _retryable(r):
            return r
        sleep(policy.delay(attempt, retry_after_seconds(r.headers)))
    raise AssertionError("unreachable")  # pragma: no cover
