"""Failed authentications, summarised: one audit event (ledger leaf) per client per time window.

For: keeping unauthenticated noise out of the Merkle log. A request without a valid key is not an
act of any principal; recording each one as its own ledger leaf lets anyone on the network grow
the log (and its proofs and exports) without limit. Instead, each failure is counted in memory per
client address and fixed window (``SOM_AUTH_FAILURE_WINDOW_SECONDS``), and when the window ends one
``auth.failures`` event is emitted per (client, window) with the count, the first and last time,
and bounded samples (at most :data:`SAMPLE` each) of the key prefixes presented, the paths, the
methods and the reasons. At most :data:`MAX_SOURCES` clients are tracked per window; the rest are
counted together under the source ``*``. A storm of N bad requests from one client therefore
appends one leaf per window it spans, whatever N is.

Flushed by a daemon thread of the runtime (about twice per window) and, for what is left, when
the runtime closes. A process that is killed loses at most one window of counts; that is the
price of not writing per request.

Not for: authenticated denials (a real principal refused on an object): those stay one
``authz.denied`` event each (:func:`marketplace.services.audit.emit_detached`). Not for
throttling either (the identity layer answers 429; this module only records).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from marketplace.services import audit
from marketplace.services.audit import _fit

if TYPE_CHECKING:
    from marketplace.runtime import Runtime

__all__ = ["MAX_SOURCES", "SAMPLE", "FailureSummaries", "flush", "note"]

log = logging.getLogger("som.audit")

MAX_SOURCES = 256
"""Clients tracked separately per window; beyond that they are counted under source ``*``."""
SAMPLE = 8
"""Distinct key prefixes, paths, methods and reasons kept per summary (the most frequent)."""


@dataclass
class _Bucket:
    count: int = 0
    first: float = 0.0
    last: float = 0.0
    prefixes: Counter[str] = field(default_factory=Counter)
    paths: Counter[str] = field(default_factory=Counter)
    methods: Counter[str] = field(default_factory=Counter)
    reasons: Counter[str] = field(default_factory=Counter)
    request_id: str = ""

    def add(self, now: float, prefix: str, path: str, method: str, reason: str, request_id: str) -> None:
        if self.count == 0:
            self.first, self.request_id = now, request_id
        self.count += 1
        self.last = now
        for ctr, value in ((self.prefixes, prefix), (self.paths, path), (self.methods, method), (self.reasons, reason)):
            if value and (value in ctr or len(ctr) < 4 * SAMPLE):  # bounded memory per bucket
                ctr[value] += 1


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).isoformat()


class FailureSummaries:
    """The runtime's summaries of failed authentications (:attr:`Runtime.auth_failures`): a
    thread, started on the first failure, emits each ended window's summaries."""

    def __init__(self, rt: Runtime) -> None:
        self.rt = rt
        self.window = float(rt.settings.auth_failure_window_seconds)
        self.lock = threading.Lock()
        self.buckets: dict[tuple[float, str], _Bucket] = {}
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="som-auth-failures", daemon=True)

    def note(self, source: str, prefix: str, path: str, method: str, reason: str, request_id: str) -> None:
        now = time.time()
        start = math.floor(now / self.window) * self.window
        with self.lock:
            if not self.thread.is_alive() and not self.stop.is_set():
                self.thread.start()
            key = (start, source)
            if key not in self.buckets and sum(1 for s, _ in self.buckets if s == start) >= MAX_SOURCES:
                key = (start, "*")
            self.buckets.setdefault(key, _Bucket()).add(now, prefix, path, method, reason, request_id)

    def flush(self, *, everything: bool = False) -> int:
        """Emit the summaries of ended windows (all of them with ``everything``); how many."""
        now = time.time()
        with self.lock:
            due = [k for k in self.buckets if everything or k[0] + self.window <= now]
            taken = [(k, self.buckets.pop(k)) for k in sorted(due)]
        for (start, source), b in taken:
            detail: dict[str, Any] = {
                "count": b.count,
                "window_start": _iso(start),
                "window_seconds": self.window,
                "first": _iso(b.first),
                "last": _iso(b.last),
                "key_prefixes": dict(b.prefixes.most_common(SAMPLE)),
                "paths": dict(b.paths.most_common(SAMPLE)),
                "methods": dict(b.methods.most_common(SAMPLE)),
                "reasons": dict(b.reasons.most_common(SAMPLE)),
            }
            try:
                audit.emit_detached(
                    self.rt.sessions,
                    audit.Actor(actor="anonymous", org_id=None, request_id=b.request_id),
                    "auth.failures",
                    target=source,
                    outcome="denied",
                    detail=detail,
                )
            except Exception:  # noqa: BLE001 - recording must not take the server down
                log.exception("could not record %d failed authentications from %s", b.count, source)
        return len(taken)

    def _run(self) -> None:
        every = max(0.1, self.window / 2)
        while not self.stop.wait(every):
            self.flush()

    def close(self) -> None:
        with self.lock:
            self.stop.set()
            started = self.thread.ident is not None
        if started:
            self.thread.join(timeout=5)
        self.flush(everything=True)


def note(rt: Runtime, *, source: str, prefix: str, path: str, method: str, reason: str, request_id: str = "") -> None:
    """Count one failed authentication from ``source`` (the client's address)."""
    rt.auth_failures.note(
        _fit(source or "unknown", 200),
        _fit(prefix, 40),
        _fit(path, 200),
        _fit(method, 16),
        _fit(reason, 200),
        request_id,
    )


def flush(rt: Runtime, *, everything: bool = False) -> int:
    """Emit pending summaries now (ended windows; every window with ``everything``)."""
    return rt.auth_failures.flush(everything=everything)
