"""FastAPI dependencies: the runtime, the caller's principal, pagination.

The principal is resolved here and nowhere else (docs/authentication.md): the ``Authorization``
header is parsed once, by FastAPI's ``HTTPBearer`` (the scheme is case-insensitive, RFC 9110
§11.1); failed attempts are throttled per client address and per key prefix; and agent keys are
confined here. :data:`Auth`, which every route outside the agent protocol takes, refuses agent
keys; only the agent protocol routes and ``/v1/whoami`` take :data:`AnyAuth`.
"""

from __future__ import annotations

import logging
from typing import Annotated

from fastapi import Depends, Query, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from marketplace.api.cookie_auth import SESSION_COOKIE, session_principal
from marketplace.errors import Forbidden, Throttled, Unauthenticated
from marketplace.runtime import Runtime
from marketplace.services import audit, auth_failures
from marketplace.services.identity import KeyRefused, Principal, authenticate, key_prefix
from marketplace.services.sso import check_key_owner

__all__ = [
    "AnyAuth",
    "Auth",
    "Page",
    "Rt",
    "actor_of",
    "get_any_principal",
    "get_principal",
    "get_runtime",
    "request_id",
]

log = logging.getLogger("som.auth")
_bearer = HTTPBearer(auto_error=False, description="API key: `Authorization: Bearer som_...`")


def get_runtime(request: Request) -> Runtime:
    rt: Runtime = request.app.state.runtime
    return rt


def request_id(request: Request) -> str:
    return str(getattr(request.state, "request_id", ""))


Rt = Annotated[Runtime, Depends(get_runtime)]


def get_any_principal(
    request: Request,
    rt: Rt,
    creds: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> Principal:
    """The caller's principal, of any key kind (agent keys included): for the agent protocol only.

    A browser signed in with SSO presents a session cookie instead (docs/sso.md)."""
    if "authorization" not in request.headers and SESSION_COOKIE in request.cookies:
        return session_principal(request, rt)
    presented = creds.credentials if creds else None
    prefix = key_prefix(presented) if presented else ""
    client = request.client.host if request.client else ""
    if presented:
        wait = rt.auth_throttle.retry_after(client=client, prefix=prefix)
        if wait is not None:
            # Not audited (it would be one ledger leaf per refused guess); the log says it.
            log.warning(
                "failed-authentication throttle: 429 for client %r, prefix %r, retry after %d s", client, prefix, wait
            )
            raise Throttled(
                f"too many failed authentications; retry after {wait} s", headers={"Retry-After": str(wait)}
            )
    try:
        with rt.tx() as s:
            p = authenticate(s, presented)
            check_key_owner(s, p)  # a user's personal key stops with the user's roles
    except Unauthenticated as e:
        if presented:
            rt.auth_throttle.failed(client=client, prefix=prefix)
        # The one place failed authentications are recorded: counted and summarised per client
        # and window (``auth.failures``), not one ledger leaf each.
        auth_failures.note(
            rt,
            source=client,
            prefix=prefix,
            path=request.url.path,
            method=request.method,
            reason=e.reason if isinstance(e, KeyRefused) else "missing",
            request_id=request_id(request),
        )
        raise
    request.state.principal = p
    return p


def get_principal(request: Request, p: Annotated[Principal, Depends(get_any_principal)]) -> Principal:
    """The caller's principal; agent keys are refused (403, audited): every non-agent route takes this."""
    if p.kind == "agent":
        raise Forbidden(
            "agent keys may only use the agent protocol (/v1/agent/...); use a provider key",
            denied=request.url.path,
        )
    return p


Auth = Annotated[Principal, Depends(get_principal)]
AnyAuth = Annotated[Principal, Depends(get_any_principal)]


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
