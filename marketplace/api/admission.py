"""Admission control: shed compute requests beyond a bound, so admitted ones and reads stay fast.

For: the routes that spend a compute slot (HE inference ``POST /v1/offerings/{id}/infer``, the
gateway's ``POST /v1/offerings/{id}/predict``, job submission ``POST /v1/jobs`` and
``POST /v1/jobs/{id}/payload``). At most ``SOM_ADMISSION_COMPUTE_CONCURRENCY`` of them run at once
in this process; up to ``SOM_ADMISSION_QUEUE`` more wait, each at most
``SOM_ADMISSION_QUEUE_TIMEOUT_SECONDS``; any other is answered at once with ``503``,
``Retry-After`` and the JSON error shape (code ``overloaded``), before its body is read and before
anything is reserved or charged. Reads (catalog, contracts, ledger, health, the UI) are never
queued here: they keep answering while compute is saturated. The SDK retries a shed request
with the same Idempotency-Key after ``Retry-After`` (:mod:`marketplace.sdk.retry`).
Not for: fairness between organisations or contracts (the contract's rate limit, 429, does that),
or limits across replicas (each process bounds itself; a load balancer spreads the rest).

Pattern: Envoy's adaptive concurrency / Google SRE "handling overload": a bounded number of
requests in flight and a bounded wait, rejected early and cheaply, instead of an unbounded queue
whose latency grows until every request times out.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

__all__ = ["AdmissionLimits", "AdmissionMiddleware", "RouteClass", "route_class"]

log = logging.getLogger("som.admission")

ASGIApp = Callable[..., Any]

_COMPUTE = (
    re.compile(r"^/v1/offerings/[^/]+/(infer|predict)$"),
    re.compile(r"^/v1/jobs$"),
    re.compile(r"^/v1/jobs/[^/]+/payload$"),
)


class RouteClass(StrEnum):
    COMPUTE = "compute"
    READ = "read"


def route_class(method: str, path: str) -> RouteClass:
    """``compute`` for a POST to a route that spends a compute slot, else ``read``."""
    if method == "POST" and any(p.match(path) for p in _COMPUTE):
        return RouteClass.COMPUTE
    return RouteClass.READ


@dataclass(frozen=True)
class AdmissionLimits:
    concurrency: int
    queue: int
    queue_timeout: float
    retry_after: int


class AdmissionMiddleware:
    """Pure ASGI: counts compute requests in flight per process (one event loop: no lock needed
    beyond the asyncio semaphore); sheds the rest with 503 + Retry-After."""

    def __init__(self, app: ASGIApp, limits: AdmissionLimits) -> None:
        self.app = app
        self.limits = limits
        self._slots = asyncio.Semaphore(max(1, limits.concurrency))
        self._waiting = 0
        self.shed = 0  # how many were refused (for logs and tests)

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http" or route_class(scope.get("method", ""), scope.get("path", "")) is RouteClass.READ:
            await self.app(scope, receive, send)
            return
        if not await self._admit():
            self.shed += 1
            await self._refuse(scope, send)
            return
        try:
            await self.app(scope, receive, send)
        finally:
            self._slots.release()

    async def _admit(self) -> bool:
        if not self._slots.locked():
            await self._slots.acquire()  # a free slot: returns at once
            return True
        if self._waiting >= self.limits.queue or self.limits.queue_timeout <= 0:
            return False
        self._waiting += 1
        try:
            await asyncio.wait_for(self._slots.acquire(), self.limits.queue_timeout)
            return True
        except TimeoutError:
            return False
        finally:
            self._waiting -= 1

    async def _refuse(self, scope: dict[str, Any], send: Any) -> None:
        err: dict[str, Any] = {
            "code": "overloaded",
            "message": (
                f"the server is at its limit of {self.limits.concurrency} compute requests in flight "
                f"and {self.limits.queue} waiting; nothing was charged: retry after "
                f"{self.limits.retry_after} s with the same Idempotency-Key"
            ),
        }
        rid = scope.get("state", {}).get("request_id")
        if rid:
            err["request_id"] = rid
        body = json.dumps({"error": err}).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 503,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    (b"retry-after", str(self.limits.retry_after).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})
