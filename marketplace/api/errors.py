"""One place that maps errors to JSON responses ``{"error": {"code", "message"}}``."""

from __future__ import annotations

import json
import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from marketplace.errors import MarketplaceError
from marketplace.services import audit

__all__ = ["ERROR_SCHEMA", "document_errors", "error_body", "install_error_handlers"]

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


#: The JSON schema of every error body (what :func:`error_body` builds).
ERROR_SCHEMA: dict[str, Any] = {
    "title": "Error",
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["code", "message"],
            "properties": {
                "code": {"type": "string", "description": "Stable machine-readable code, e.g. `not_found`."},
                "message": {"type": "string", "description": "What went wrong, for a human."},
                "request_id": {"type": "string", "description": "Names the request in the server's logs."},
                "details": {
                    "type": "array",
                    "description": "Every validation problem (422 from request validation).",
                    "items": {
                        "type": "object",
                        "properties": {
                            "loc": {"type": "array", "items": {"type": "string"}},
                            "msg": {"type": "string"},
                        },
                    },
                },
            },
            "additionalProperties": True,
        }
    },
}

_ERROR_TEXT = {
    401: "Missing, unknown, expired or revoked API key.",
    403: "The key's roles do not allow this, or the contract's policy denies the use (`policy_denied`).",
    404: "No such object, or one of another organisation.",
    409: "The object's state does not allow this.",
    413: "The request body is over its limit.",
    415: "Wrong content type or artifact format.",
    422: "Well-formed request with bad values.",
    429: (
        "The contract's rate limit, or too many failed authentications from this client or for this key; "
        "retry after `Retry-After` seconds."
    ),
    503: "A dependency (the provider's agent, a compiled model) is not available now; try again later.",
}


def _error_statuses(path: str, method: str, op: dict[str, Any]) -> set[int]:
    """The error statuses an operation can answer, from what it takes (the rules of marketplace.errors)."""
    params = op.get("parameters", [])
    body = op.get("requestBody", {}).get("content", {})
    out = {422} if "422" in op.get("responses", {}) else set()
    if body:
        out |= {413}
    if "application/octet-stream" in body:
        out |= {415}
    if op.get("security"):
        out |= {401, 403, 429}  # 429: failed authentications are throttled (docs/authentication.md)
        in_path = any(p["in"] == "path" for p in params)
        if body or any(p["name"] not in ("limit", "offset") for p in params):
            out |= {404}  # an object (or tree size, ...) it names does not exist or is not yours
        if method != "get" or in_path:
            out |= {409}  # the state of the object does not allow it
        if any(p["in"] == "header" and p["name"].lower() == "idempotency-key" for p in params):
            out |= {429, 503}  # metered: the contract's rate; the compute site
    return out


def document_errors(app: FastAPI) -> None:
    """Declare the error responses, with :data:`ERROR_SCHEMA`, in the app's OpenAPI document.

    FastAPI documents only its own 422 body (``{"detail": ...}``), which this API never sends;
    it is replaced, and 401/403/404/409/413/415/429/503 are added where the operation can answer them.
    """
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        doc = generate()
        schemas = doc.setdefault("components", {}).setdefault("schemas", {})
        schemas["Error"] = ERROR_SCHEMA
        ref = {"$ref": "#/components/schemas/Error"}
        for path, ops in doc.get("paths", {}).items():
            for method, op in ops.items():
                responses = op.setdefault("responses", {})
                for status in sorted(_error_statuses(path, method, op)):
                    responses[str(status)] = {
                        "description": _ERROR_TEXT[status],
                        "content": {"application/json": {"schema": ref}},
                    }
        if "schemas/HTTPValidationError" not in json.dumps(doc["paths"]):
            schemas.pop("HTTPValidationError", None)
            if "schemas/ValidationError" not in json.dumps(doc):
                schemas.pop("ValidationError", None)
        app.openapi_schema = doc
        return doc

    app.openapi = openapi  # type: ignore[method-assign]


def install_error_handlers(app: FastAPI) -> None:
    document_errors(app)

    @app.exception_handler(MarketplaceError)
    async def _domain(request: Request, exc: MarketplaceError) -> JSONResponse:
        principal = getattr(request.state, "principal", None)
        if exc.denied is not None and principal is not None:
            who = audit.Actor(
                actor=principal.key_id,
                org_id=principal.org_id,
                request_id=str(getattr(request.state, "request_id", "")),
            )
            await run_in_threadpool(
                audit.emit_detached,
                request.app.state.runtime.sessions,
                who,
                "authz.denied",
                target=exc.denied,
                outcome="denied",
                detail={"status": exc.status, "method": request.method},
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
        return JSONResponse(error_body("invalid", msg, request, details=details), status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 400:
            # FastAPI's "There was an error parsing the body" (e.g. a JSON body that is not UTF-8):
            # the same bad input as malformed JSON, which is a 422 ``invalid``.
            return JSONResponse(
                error_body("invalid", f"body: could not be parsed ({exc.detail}); send UTF-8 JSON", request),
                status_code=422,
            )
        code = {404: "not_found", 405: "method_not_allowed", 401: "unauthenticated"}.get(exc.status_code, "http_error")
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
