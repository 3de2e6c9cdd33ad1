"""The web UI: static files under ``/ui/`` (plain HTML, CSS and ES modules, no build step).

For: serving ``marketplace/web/static/`` with strict security headers, and sending ``/`` to
``/ui/``. The UI is a client of the public ``/v1`` API like the SDK: it holds the user's API key in
``sessionStorage`` and sends it as a bearer token, or uses the SSO session cookie with its CSRF
token (``routes_auth.py``, docs/sso.md); the server gives it nothing the API does not.
Not for: any server-side rendering, and not part of the OpenAPI document (these routes are not API).
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, FastAPI
from fastapi.responses import JSONResponse, RedirectResponse
from starlette.exceptions import HTTPException
from starlette.responses import Response
from starlette.staticfiles import StaticFiles
from starlette.types import Scope

import marketplace.web

__all__ = ["SECURITY_HEADERS", "STATIC_DIR", "UI_PREFIX", "UIFiles", "mount_ui", "router"]

UI_PREFIX = "/ui"
STATIC_DIR = Path(marketplace.web.__file__).resolve().parent / "static"

# Scripts and styles only from this origin: no inline script, no eval, no inline style, no
# third-party anything. The UI builds every node with the DOM API (no innerHTML), so a model card
# cannot inject markup; the policy is the second wall.
CSP = "; ".join(
    [
        "default-src 'none'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self' data:",
        "connect-src 'self'",
        "base-uri 'none'",
        "form-action 'self'",
        "frame-ancestors 'none'",
    ]
)

SECURITY_HEADERS: dict[str, str] = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cache-Control": "no-cache",
}

router = APIRouter(include_in_schema=False)


class UIFiles(StaticFiles):
    """StaticFiles that adds :data:`SECURITY_HEADERS` to every response, errors included."""

    async def get_response(self, path: str, scope: Scope) -> Response:
        try:
            resp = await super().get_response(path, scope)
        except HTTPException as e:
            body = {"error": {"code": "not_found" if e.status_code == 404 else "http_error", "message": str(e.detail)}}
            resp = JSONResponse(body, status_code=e.status_code)
        resp.headers.update(SECURITY_HEADERS)
        return resp


@router.get("/", include_in_schema=False)
def root() -> RedirectResponse:
    return RedirectResponse(UI_PREFIX + "/", status_code=307)


@router.get(UI_PREFIX, include_in_schema=False)
def ui_no_slash() -> RedirectResponse:
    return RedirectResponse(UI_PREFIX + "/", status_code=307)


def mount_ui(app: FastAPI) -> None:
    """Mount the static UI at ``/ui`` (``index.html`` for ``/ui/``; a mount: routers cannot hold one)."""
    app.mount(UI_PREFIX, UIFiles(directory=STATIC_DIR, html=True), name="ui")
