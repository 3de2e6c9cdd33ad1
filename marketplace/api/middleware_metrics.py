"""ASGI middleware: ``http_server_request_duration_seconds`` for every HTTP request.

The ``http_route`` label is the matched route's template (``/v1/offerings/{offering_id}``), read
from ``scope["route"]`` after routing, or by matching the app's routes when the request was
answered before routing (a 413 from the body limit) by matching the app's route templates; a
path that matches no route is ``unmatched``. So label values are bounded by the app's routes, whatever paths
clients send.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from typing import Any

from starlette.routing import Mount

from marketplace.services import monitoring

Scope = dict[str, Any]
ASGIApp = Callable[..., Any]

__all__ = ["UNMATCHED", "HttpMetricsMiddleware", "route_template", "route_templates"]

UNMATCHED = "unmatched"


def _template(route: Any) -> str | None:
    t = getattr(route, "path_format", None) or getattr(route, "path", None)
    return t if isinstance(t, str) and t else None


def _compile(template: str) -> re.Pattern[str]:
    parts = re.split(r"(\{[^}]*\})", template)
    rx = "".join(("(.*)" if p.endswith(":path}") else "([^/]+)") if p.startswith("{") else re.escape(p) for p in parts)
    return re.compile(rx + "$")


def route_templates(app: Any) -> list[tuple[re.Pattern[str], str]]:
    """Every route template of ``app`` (the OpenAPI paths, plus routes and mounts outside the
    schema), most specific first; cached on ``app.state``."""
    cached = getattr(app.state, "route_templates", None)
    if cached is not None:
        return list(cached)
    found = set(app.openapi().get("paths", {}))
    # routes outside the schema (the UI's redirects, /metrics): create_app lists every router's paths
    found.update(getattr(app.state, "route_paths", ()))
    for r in getattr(app.router, "routes", ()):
        t = getattr(r, "path", None)
        if isinstance(t, str) and t:
            found.add(t + "/{path:path}" if isinstance(r, Mount) else t)
    out = [(_compile(t), t.replace(":path}", "}")) for t in sorted(found, key=lambda t: (t.count("{"), -len(t), t))]
    app.state.route_templates = out
    return list(out)


def route_template(scope: Scope) -> str:
    """The template of the route ``scope`` was routed to (``scope["route"]``), or, for a request
    answered before routing, of the first template its path matches; :data:`UNMATCHED` if none."""
    t = _template(scope.get("route"))
    if t:
        return t
    app = scope.get("app")
    if app is None or not hasattr(app, "openapi"):
        return UNMATCHED
    path = str(scope.get("path", ""))
    for rx, template in route_templates(app):
        if rx.match(path):
            return template
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
            monitoring.record_http(
                route_template(scope), str(scope.get("method", "")), status, time.perf_counter() - start
            )
