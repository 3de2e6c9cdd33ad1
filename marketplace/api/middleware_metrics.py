"""ASGI middleware: ``http_server_request_duration_seconds`` for every HTTP request.

The ``http_route`` label is the matched route's template (``/v1/offerings/{offering_id}``), read
from ``scope["route"]`` after routing, or by matching the app's routes when the request was
answered before routing (a 413 from the body limit); a path that matches no route is
``unmatched``. So label values are bounded by the app's routes, whatever paths clients send.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from starlette.routing import Match

from marketplace.services import monitoring

Scope = dict[str, Any]
ASGIApp = Callable[..., Any]

__all__ = ["UNMATCHED", "HttpMetricsMiddleware", "route_template"]

UNMATCHED = "unmatched"


def _template(route: Any) -> str | None:
    t = getattr(route, "path_format", None) or getattr(route, "path", None)
    return t if isinstance(t, str) and t else None


def route_template(scope: Scope) -> str:
    """The template of the route ``scope`` was (or would be) routed to; :data:`UNMATCHED` if none."""
    t = _template(scope.get("route"))
    if t:
        return t
    app = scope.get("app")
    for route in getattr(getattr(app, "router", None), "routes", ()):
        try:
            match, _ = route.matches(scope)
        except Exception:  # noqa: BLE001, S112 - an odd route must not break metrics
            continue
        if match is not Match.NONE:
            return _template(route) or UNMATCHED
    return UNMATCHED


class HttpMetricsMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def _send(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message.get("status", 500))
            await send(message)

        try:
            await self.app(scope, receive, _send)
        finally:
            monitoring.record_http(route_template(scope), str(scope.get("method", "")), status, time.perf_counter() - start)
