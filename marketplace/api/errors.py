"""One place that maps errors to JSON responses ``{"error": {"code", "message"}}``."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from marketplace.errors import MarketplaceError

__all__ = ["error_body", "install_error_handlers"]

log = logging.getLogger("som.api")


def error_body(code: str, message: str, request: Request | None = None, **extra: Any) -> dict[str, Any]:
    err: dict[str, Any] = {"code": code, "message": message}
    err.update({k: v for k, v in extra.items() if v is not None})
    if request is not None:
        rid = getattr(request.state, "request_id", None)
        if rid:
            err["request_id"] = rid
    return {"error": err}


def _clean(errors: list[Any]) -> list[dict[str, Any]]:
    out = []
    for e in errors:
        out.append({"loc": [str(x) for x in e.get("loc", ())], "msg": str(e.get("msg", ""))})
    return out


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(MarketplaceError)
    async def _domain(request: Request, exc: MarketplaceError) -> JSONResponse:
        principal = getattr(request.state, "principal", None)
        if exc.denied is not None and principal is not None:
            from starlette.concurrency import run_in_threadpool

            from marketplace.services import audit

            who = audit.Actor(actor=principal.key_id, org_id=principal.org_id,
                              request_id=str(getattr(request.state, "request_id", "")))
            await run_in_threadpool(
                audit.emit_detached, request.app.state.runtime.sessions, who, "authz.denied",
                target=exc.denied, outcome="denied", detail={"status": exc.status, "method": request.method},
            )
        return JSONResponse(
            error_body(exc.code, exc.message, request, **exc.extra),
            status_code=exc.status,
            headers=exc.headers,
        )

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        details = _clean(list(exc.errors()))
        first = details[0] if details else {"loc": [], "msg": "invalid request"}
        msg = f"{'.'.join(first['loc'])}: {first['msg']}" if first["loc"] else str(first["msg"])
        return JSONResponse(
            error_body("invalid", msg, request, details=details), status_code=422
        )

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed", 401: "unauthenticated"}.get(
            exc.status_code, "http_error"
        )
        return JSONResponse(
            error_body(code, str(exc.detail), request),
            status_code=exc.status_code,
            headers=getattr(exc, "headers", None),
        )

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error", exc_info=exc)
        request.app.state.internal_errors = getattr(request.app.state, "internal_errors", 0) + 1
        return JSONResponse(
            error_body("internal", "internal error; the request id identifies it in the logs", request),
            status_code=500,
        )
