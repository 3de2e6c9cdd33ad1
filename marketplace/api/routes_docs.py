"""The interactive API docs, ``/docs`` (Swagger UI) and ``/redoc`` (ReDoc), served from this origin.

For: FastAPI's two docs pages, built with ``get_swagger_ui_html``/``get_redoc_html`` but pointing at
the Swagger UI and ReDoc dist files that the ``fastapi-offline`` package ships (served here under
``/docs/assets/``), with the UI's security headers. FastAPI's default pages load their scripts from
a CDN: a third-party script on the origin where the browser holds an API key could read it.
Not for: the OpenAPI document itself (FastAPI serves ``/openapi.json``), or the web UI (routes_web).

The pages' one inline script (Swagger UI's start-up call) is allowed by its SHA-256 in the CSP,
not by ``'unsafe-inline'``; styles allow ``'unsafe-inline'`` because both bundles inject style
elements at run time, and ReDoc starts its search worker from a ``blob:`` URL.
"""

from __future__ import annotations

import base64
import hashlib
import re
from pathlib import Path

import fastapi_offline
from fastapi import APIRouter, FastAPI, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from starlette.responses import HTMLResponse, Response

from marketplace.api.routes_web import SECURITY_HEADERS, UIFiles
from marketplace.errors import NotFound

__all__ = ["ASSETS_DIR", "ASSETS_PREFIX", "docs_csp", "mount_assets", "router"]

ASSETS_PREFIX = "/docs/assets"
ASSETS_DIR = Path(fastapi_offline.__file__).resolve().parent / "static"

router = APIRouter(include_in_schema=False)

_INLINE_SCRIPT = re.compile(r"<script>(.*?)</script>", re.S)


def docs_csp(html: str) -> str:
    """The docs pages' CSP: scripts from this origin plus the page's own inline scripts by hash."""
    hashes = " ".join(
        "'sha256-" + base64.b64encode(hashlib.sha256(m.encode()).digest()).decode() + "'"
        for m in _INLINE_SCRIPT.findall(html)
    )
    return "; ".join(
        [
            "default-src 'none'",
            f"script-src 'self' {hashes}".rstrip(),
            "style-src 'self' 'unsafe-inline'",
            "img-src 'self' data:",
            "font-src 'self'",
            "connect-src 'self'",
            "worker-src 'self' blob:",
            "base-uri 'none'",
            "form-action 'self'",
            "frame-ancestors 'none'",
        ]
    )


def _secured(page: HTMLResponse) -> Response:
    html = bytes(page.body).decode()
    headers = {**SECURITY_HEADERS, "Content-Security-Policy": docs_csp(html)}
    return HTMLResponse(html, headers=headers)


def _openapi(request: Request) -> tuple[str, str]:
    app = request.app
    if app.openapi_url is None:  # pragma: no cover - create_app always serves the document
        raise NotFound("this app serves no OpenAPI document")
    return str(app.openapi_url), str(app.title)


@router.get("/docs")
def swagger_ui(request: Request) -> Response:
    openapi_url, title = _openapi(request)
    return _secured(
        get_swagger_ui_html(
            openapi_url=openapi_url,
            title=f"{title} - Swagger UI",
            swagger_js_url=f"{ASSETS_PREFIX}/swagger-ui-bundle.js",
            swagger_css_url=f"{ASSETS_PREFIX}/swagger-ui.css",
            swagger_favicon_url=f"{ASSETS_PREFIX}/favicon.png",
            swagger_ui_parameters={"validatorUrl": None},  # no badge fetched from validator.swagger.io
        )
    )


@router.get("/redoc")
def redoc(request: Request) -> Response:
    openapi_url, title = _openapi(request)
    return _secured(
        get_redoc_html(
            openapi_url=openapi_url,
            title=f"{title} - ReDoc",
            redoc_js_url=f"{ASSETS_PREFIX}/redoc.standalone.js",
            redoc_favicon_url=f"{ASSETS_PREFIX}/favicon.png",
            with_google_fonts=False,
        )
    )


def mount_assets(app: FastAPI) -> None:
    """Serve the docs pages' local assets under ``/docs/assets`` (a mount: routers cannot hold one)."""
    app.mount(ASSETS_PREFIX, UIFiles(directory=ASSETS_DIR), name="docs-assets")
