"""The browser's session cookie as a principal (SSO sign-in), and its CSRF check.

For: :func:`session_principal`, called by :func:`marketplace.api.deps.get_principal` when a request
has no ``Authorization`` header but carries the session cookie. A cookie rides along on
cross-site requests, so every state-changing method (anything but GET, HEAD, OPTIONS) made with
it must also send ``X-CSRF-Token`` equal to the session's token (from ``GET /v1/auth/me``); a
forged form or script on another site cannot read it. Bearer API keys are never sent
automatically by a browser, so requests made with them need no CSRF token.
"""

from __future__ import annotations

from fastapi import Request

from marketplace.errors import Forbidden, Unauthenticated
from marketplace.runtime import Runtime
from marketplace.services import audit, auth_failures
from marketplace.services.identity import Principal
from marketplace.services.sso import csrf_ok, resolve_session

__all__ = ["CSRF_HEADER", "SAFE_METHODS", "SESSION_COOKIE", "session_principal"]

SESSION_COOKIE = "som_session"
CSRF_HEADER = "X-CSRF-Token"
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


def session_principal(request: Request, rt: Runtime) -> Principal:
    """The user signed in with the cookie, or 401 (no valid session) / 403 (CSRF token missing or wrong)."""
    token = request.cookies.get(SESSION_COOKIE, "")
    rid = str(getattr(request.state, "request_id", ""))
    try:
        with rt.tx() as s:
            info = resolve_session(s, token)
    except Unauthenticated:
        auth_failures.note(  # summarised per client and window, like bad keys: not one leaf each
            rt,
            source=request.client.host if request.client else "",
            prefix="session",
            path=request.url.path,
            method=request.method,
            reason="session",
            request_id=rid,
        )
        raise
    if request.method not in SAFE_METHODS and not csrf_ok(token, request.headers.get(CSRF_HEADER)):
        audit.emit_detached(
            rt.sessions,
            audit.Actor(actor=info.user_id, org_id=info.principal.org_id, request_id=rid),
            "auth.csrf_failed",
            target=request.url.path,
            outcome="denied",
            detail={"method": request.method},
        )
        raise Forbidden(f"a request made with the session cookie must send the {CSRF_HEADER} header (GET /v1/auth/me)")
    request.state.web_session = info
    request.state.principal = info.principal
    return info.principal
