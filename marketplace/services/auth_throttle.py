"""Throttling of failed authentications, per client address and per API-key prefix (OWASP API2).

For: bounding online guessing and the argon2 work an unauthenticated caller can make the server do.
Every request that presents a key is first checked here; a failed verification is recorded in two
buckets, the client's address and the presented key's prefix. A bucket holding ``limit`` failures
younger than ``window`` seconds refuses further attempts (the caller answers 429 with
``Retry-After``) until its oldest failure ages out. Throttled attempts are not verified and do not
count as failures, so a refused caller cannot extend its own lock; successes clear nothing (an
attacker cannot reset its count by interleaving a key of its own).

Prefixes are counted whether or not a key with that prefix exists, so the lock is no oracle.

Not for: a global limit across replicas. The state is in process memory, shared by every thread
of one process under one lock; with N API replicas behind a load balancer a client gets up to N
times the limit. Memory is bounded: at most ``max_buckets`` buckets of ``limit`` timestamps each,
the least recently failed evicted first. Checking and recording are two steps, so requests
verified concurrently when a bucket fills may overshoot it by the number of them in flight.
"""

from __future__ import annotations

import math
import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass

__all__ = ["FailureThrottle"]


@dataclass(frozen=True)
class _Limit:
    limit: int
    window: float


class FailureThrottle:
    """Failed-authentication counters for one process (thread-safe).

    ``per_client`` and ``per_prefix`` are the failures allowed in ``window`` seconds.
    """

    def __init__(self, *, per_client: int, per_prefix: int, window: float, max_buckets: int = 100_000) -> None:
        if per_client < 1 or per_prefix < 1:
            raise ValueError(f"limits must be >= 1, got per_client={per_client}, per_prefix={per_prefix}")
        if not window > 0:
            raise ValueError(f"window must be > 0 seconds, got {window}")
        if max_buckets < 1:
            raise ValueError(f"max_buckets must be >= 1, got {max_buckets}")
        self._limits = {"client": _Limit(per_client, window), "prefix": _Limit(per_prefix, window)}
        self._max = max_buckets
        self._lock = threading.Lock()
        self._buckets: OrderedDict[tuple[str, str], deque[float]] = OrderedDict()

    def _keys(self, client: str, prefix: str) -> list[tuple[str, str]]:
        out = [("client", client)]
        if prefix:
            out.append(("prefix", prefix))
        return out

    def retry_after(self, *, client: str, prefix: str, now: float | None = None) -> int | None:
        """Seconds to wait (>= 1) if the client or the prefix is throttled now, else None."""
        now = time.monotonic() if now is None else now
        wait = 0.0
        with self._lock:
            for key in self._keys(client, prefix):
                q = self._buckets.get(key)
                if q is None:
                    continue
                lim = self._limits[key[0]]
                while q and q[0] <= now - lim.window:
                    q.popleft()
                if len(q) >= lim.limit:
                    wait = max(wait, q[0] + lim.window - now)
        return max(1, math.ceil(wait)) if wait > 0 else None

    def failed(self, *, client: str, prefix: str, now: float | None = None) -> None:
        """Record one failed verification for the client and the prefix."""
        now = time.monotonic() if now is None else now
        with self._lock:
            for key in self._keys(client, prefix):
                q = self._buckets.get(key)
                if q is None:
                    q = self._buckets[key] = deque(maxlen=self._limits[key[0]].limit)
                    while len(self._buckets) > self._max:
                        self._buckets.popitem(last=False)
                else:
                    self._buckets.move_to_end(key)
                q.append(now)
