"""FastAPI dependencies: the runtime, the caller's principal, pagination."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Query, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from marketplace.api.cookie_auth import SESSION_COOKIE, session_principal
from marketplace.errors import Unauthenticated
from marketplace.runtime import Runtime
from marketplace.services import audit
from marketplace.services.identity import Principal, authenticate
from marketplace.services.sso import check_key_owner

__all__ = ["Auth", "Page", "Rt", "actor_of", "get_principal", "get_runtime", "request_id"]

_bearer = HTTPBearer(auto_error=False, description="API key: `Authorization: Bearer som_...`")


def get_runtime(request: Request) -> Runtime:
    rt: Runtime = request.app.state.runtime
    return rt


def request_id(request: Request) -> str:
    return str(getattr(request.state, "request_id", ""))


Rt = Annotated[Runtime, Depends(get_runtime)]


def get_principal(
    request: Request,
    rt: Rt,
    creds: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> Principal:
    if "authorization" not in request.headers and SESSION_COOKIE in request.cookies:
        return session_principal(request, rt)  # a browser signed in with SSO (docs/sso.md)
    presented = creds.credentials if creds else None
    try:
        with rt.tx() as s:
            p = authenticate(s, presented)
            check_key_owner(s, p)  # a user's personal key stops with the user's roles
    except Unauthenticated as e:
        prefix = ""
        if presented and presented.count("_") >= 2:
            prefix = presented.split("_", 2)[1][:12]
        audit.emit_detached(
            rt.sessions,
            audit.Actor(actor=f"key:{prefix}" if prefix else "anonymous", org_id=None, request_id=request_id(request)),
            "auth.failed",
            target=request.url.path,
            outcome="denied",
            detail={"reason": e.message, "method": request.method},
        )
        raise
    request.state.principal = p
    return p


Auth = Annotated[Principal, Depends(get_principal)]


def actor_of(p: Principal, request: Request) -> audit.Actor:
    return audit.Actor(actor=p.key_id, org_id=p.org_id, request_id=request_id(request))


class Pagination:
    def __init__(
        self,
        request: Request,
        limit: Annotated[int, Query(ge=1, le=1000, description="Page size.")] = 50,
        offset: Annotated[int, Query(ge=0, le=2**63 - 1, description="Items to skip.")] = 0,
    ) -> None:
        cap = get_runtime(request).settings.page_size_max
        self.limit = min(limit, cap)
        self.offset = offset


Page = Annotated[Pagination, Depends()]
