"""ASGI middleware: request ids and request-size limits (checked while streaming)."""

from __future__ import annotations

import json
import secrets
from collections.abc import Callable
from typing import Any

Scope = dict[str, Any]
ASGIApp = Callable[..., Any]

__all__ = ["BodyLimitMiddleware", "RequestIdMiddleware"]


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
    """Refuses bodies over ``limit_for(path)`` with 413, by Content-Length or while streaming."""

    def __init__(self, app: ASGIApp, limit_for: Callable[[str], int]) -> None:
        self.app = app
        self.limit_for = limit_for

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limit_for(scope["path"])
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
