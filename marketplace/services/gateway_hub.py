"""The in-memory channel between gateway calls and provider agents (provider-hosted offerings).

For: handing a consumer's rows to the provider's ``som agent`` and its predictions back without
a job round trip, a DB row or a blob. Each API process holds one :class:`Hub`: a queue of pending
requests per offering, a future per request, and the agents' long-polls waiting for work. An
agent calls ``POST /v1/agent/gateway/exchange`` over its keep-alive connection: the call carries
the answers to what it took last time and returns the next requests (waiting up to ``wait`` s),
so a busy agent makes one HTTP round trip per batch of requests.

What the agent sees: a random request id, the offering id and the rows (plaintext inputs). Not
the consumer's organisation, key, contract or idempotency key.

Thread-safe and independent of any event loop (requests wait in the threadpool). Not for
metering (the gateway service holds the reservation) or authentication (the route).
"""

from __future__ import annotations

import contextlib
import secrets
import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["AgentFailed", "AgentReply", "Hub", "Pending", "hub_of"]


@dataclass(frozen=True)
class AgentReply:
    outputs: np.ndarray
    model_s: float


@dataclass
class Pending:
    id: str
    offering_id: str
    rows: np.ndarray
    future: Future[AgentReply] = field(default_factory=Future)
    enqueued: float = field(default_factory=time.monotonic)
    taken_by: str | None = None


class Hub:
    """Pending gateway requests per offering; agents' presence; thread-safe."""

    def __init__(self) -> None:
        self._cv = threading.Condition()
        self._queues: dict[str, deque[Pending]] = {}
        self._inflight: dict[str, Pending] = {}
        self._seen: dict[str, float] = {}  # offering -> monotonic time an agent last polled
        self._waiting: dict[str, int] = {}  # offering -> agents polling now
        self._input_dims: dict[str, int] = {}

    # -- consumer side ---------------------------------------------------------------------

    def online(self, offering_id: str, *, within: float) -> bool:
        """An agent is polling for ``offering_id`` now, or polled within ``within`` seconds."""
        with self._cv:
            if self._waiting.get(offering_id, 0) > 0:
                return True
            seen = self._seen.get(offering_id)
        return seen is not None and time.monotonic() - seen <= within

    def input_dim(self, offering_id: str) -> int | None:
        """The input width the offering's agent announced (None: not yet)."""
        with self._cv:
            return self._input_dims.get(offering_id)

    def submit(self, offering_id: str, rows: np.ndarray) -> Pending:
        p = Pending(id="gw_" + secrets.token_hex(12), offering_id=offering_id, rows=rows)
        with self._cv:
            self._queues.setdefault(offering_id, deque()).append(p)
            self._cv.notify_all()
        return p

    def abandon(self, p: Pending) -> None:
        """Forget ``p`` (timed out): out of the queue if not taken; a late answer is dropped."""
        with self._cv:
            q = self._queues.get(p.offering_id)
            if q is not None:
                with contextlib.suppress(ValueError):
                    q.remove(p)
            self._inflight.pop(p.id, None)
        p.future.cancel()

    # -- agent side ------------------------------------------------------------------------

    def take(self, agent_id: str, offerings: frozenset[str], *, wait: float, limit: int) -> list[Pending]:
        """Up to ``limit`` pending requests for ``offerings``, waiting up to ``wait`` s for one."""
        deadline = time.monotonic() + max(0.0, wait)
        with self._cv:
            for o in offerings:
                self._waiting[o] = self._waiting.get(o, 0) + 1
            try:
                while True:
                    now = time.monotonic()
                    for o in offerings:
                        self._seen[o] = now
                    got: list[Pending] = []
                    for o in sorted(offerings):
                        q = self._queues.get(o)
                        while q and len(got) < limit:
                            p = q.popleft()
                            if p.future.cancelled():
                                continue
                            p.taken_by = agent_id
                            self._inflight[p.id] = p
                            got.append(p)
                    if got:
                        return got
                    left = deadline - now
                    if left <= 0:
                        return []
                    self._cv.wait(left)
            finally:
                for o in offerings:
                    self._waiting[o] -= 1
                    self._seen[o] = time.monotonic()

    def announce(self, offerings: frozenset[str], input_dims: dict[str, int]) -> None:
        with self._cv:
            for o, d in input_dims.items():
                if o in offerings:
                    self._input_dims[o] = int(d)

    def answer(
        self,
        agent_id: str,
        offerings: frozenset[str],
        request_id: str,
        *,
        outputs: Any = None,
        error: str | None = None,
        model_s: float = 0.0,
    ) -> bool:
        """Resolve a request this agent took. False if unknown, not its own, or already gone."""
        with self._cv:
            p = self._inflight.get(request_id)
            if p is None or p.taken_by != agent_id or p.offering_id not in offerings:
                return False
            del self._inflight[request_id]
        if p.future.done():
            return False
        if error is not None:
            p.future.set_exception(AgentFailed(error[:500]))
            return True
        try:
            arr = np.asarray(outputs, dtype=np.float64)
        except (TypeError, ValueError):
            arr = np.empty((0, 0))
        if arr.ndim != 2 or arr.shape[0] != p.rows.shape[0] or not np.all(np.isfinite(arr)):
            p.future.set_exception(AgentFailed("the agent sent a malformed result"))
            return True
        p.future.set_result(AgentReply(arr, max(0.0, float(model_s))))
        return True


class AgentFailed(Exception):
    """The agent could not answer a request (its message is for the consumer)."""


_lock = threading.Lock()


def hub_of(rt: Any) -> Hub:
    """The runtime's hub (one per API process)."""
    with _lock:
        hub: Hub | None = rt.gateway_hub
        if hub is None:
            hub = rt.gateway_hub = Hub()
    return hub
