"""ASGI middleware: request ids and request-size limits (checked while streaming).

Each route that takes a large binary body declares its limit with a dependency,
``dependencies=[body_limit(BodyLimit.BINARY)]``; every other route gets ``max_request_bytes``.
The middleware finds the route before the body is read (:func:`route_limits`) and refuses a
larger body with 413 ``payload_too_large``, by Content-Length or while streaming.

=====================  ==================================================  ======================
``BodyLimit``          limit                                               routes
=====================  ==================================================  ======================
``JSON`` (default)     ``max_request_bytes``                               everything else
``CIPHERTEXT``         ``max_ciphertext_bytes``                            key sets, HE inference
``BINARY``             ``max(max_upload_bytes, max_sealed_bytes) + 1024``  uploads, sealed inputs
                                                                           and results
=====================  ==================================================  ======================
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Callable, Iterable
from enum import StrEnum
from typing import Any

from fastapi import APIRouter, Depends
from fastapi.params import Depends as DependsParam
from fastapi.routing import APIRoute
from starlette.routing import Match

from marketplace.settings import Settings

Scope = dict[str, Any]
ASGIApp = Callable[..., Any]

__all__ = ["BodyLimit", "BodyLimitMiddleware", "RequestIdMiddleware", "body_limit", "route_limits"]


class BodyLimit(StrEnum):
    """Which request-body limit a route has (the table in the module docstring)."""

    JSON = "json"
    CIPHERTEXT = "ciphertext"
    BINARY = "binary"

    def bytes(self, s: Settings) -> int:
        if self is BodyLimit.CIPHERTEXT:
            return s.max_ciphertext_bytes
        if self is BodyLimit.BINARY:
            return max(s.max_upload_bytes, s.max_sealed_bytes) + 1024
        return s.max_request_bytes


def _marker(kind: BodyLimit) -> Callable[[], None]:
    def declared() -> None:
        """Declares the route's body limit; the middleware enforces it before the route runs."""

    declared.body_limit = kind  # type: ignore[attr-defined]
    return declared


_MARKERS = {kind: _marker(kind) for kind in BodyLimit}


def body_limit(kind: BodyLimit) -> DependsParam:
    """The route dependency that declares ``kind`` as the route's body limit."""
    return Depends(_MARKERS[kind])  # type: ignore[no-any-return]


def _declared(route: APIRoute) -> BodyLimit:
    for dep in route.dependant.dependencies:
        kind = getattr(dep.call, "body_limit", None)
        if isinstance(kind, BodyLimit):
            return kind
    return BodyLimit.JSON


def route_limits(routers: Iterable[APIRouter], settings: Settings) -> Callable[[Scope], int]:
    """``limit_for(scope)``: the body limit of the route of ``routers`` that ``scope`` goes to
    (``max_request_bytes`` for a route that declares none, or no route)."""
    default = BodyLimit.JSON.bytes(settings)
    declared = [
        (route, _declared(route).bytes(settings))
        for router in routers
        for route in router.routes
        if isinstance(route, APIRoute) and _declared(route) is not BodyLimit.JSON
    ]

    def limit_for(scope: Scope) -> int:
        for route, limit in declared:
            if route.matches(scope)[0] is Match.FULL:
                return limit
        return default

    return limit_for


async def _send_error(send: Any, status: int, code: str, message: str) -> None:
    body = json.dumps({"error": {"code": code, "message": message}}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})


class RequestIdMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = ""
        for k, v in scope.get("headers", []):
            if k == b"x-request-id":
                rid = v.decode("latin-1")[:64]
        if not rid or not all(c.isalnum() or c in "-_." for c in rid):
            rid = "req_" + secrets.token_hex(8)
        scope.setdefault("state", {})["request_id"] = rid

        async def _send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                message.setdefault("headers", [])
                message["headers"] = list(message["headers"]) + [(b"x-request-id", rid.encode())]
            await send(message)

        await self.app(scope, receive, _send)


class _TooLarge(Exception):
    pass


class BodyLimitMiddleware:
    """Refuses bodies over ``limit_for(scope)`` with 413, by Content-Length or while streaming."""

    def __init__(self, app: ASGIApp, limit_for: Callable[[Scope], int]) -> None:
        self.app = app
        self.limit_for = limit_for

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limit_for(scope)
        for k, v in scope.get("headers", []):
            if k == b"content-length":
                try:
                    n = int(v)
                except ValueError:
                    await _send_error(send, 400, "bad_request", "invalid Content-Length")
                    return
                if n > limit:
                    await _send_error(
                        send, 413, "payload_too_large", f"request body of {n} bytes exceeds the limit of {limit} bytes"
                    )
                    return
        seen = 0
        started = False

        async def _receive() -> dict[str, Any]:
            nonlocal seen
            message: dict[str, Any] = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise _TooLarge
            return message

        async def _send(message: dict[str, Any]) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, _receive, _send)
        except _TooLarge:
            if not started:
                await _send_error(send, 413, "payload_too_large", f"request body exceeds the limit of {limit} bytes")
