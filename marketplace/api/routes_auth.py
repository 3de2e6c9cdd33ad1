"""SSO sign-in for people: OIDC authorization code flow + PKCE, web sessions, personal API keys.

Routes: ``GET /v1/auth/config`` (is SSO on), ``GET /v1/auth/login`` (redirect to the OP),
``GET /v1/auth/callback`` (the OP's redirect back), ``POST /v1/auth/logout``, ``GET /v1/auth/me``
(the principal, and the CSRF token of a cookie session), ``POST /v1/auth/keys`` (a personal key).
Cookies: ``som_oidc_state`` binds a login to the browser that started it (path /v1/auth, 10 min);
``som_session`` holds the session's random id. Both HttpOnly, SameSite=Lax, Secure over https.
docs/sso.md says what is checked and audited.
"""

from __future__ import annotations

import html
from datetime import datetime
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from pydantic import BaseModel, Field

from marketplace.api.cookie_auth import SESSION_COOKIE
from marketplace.api.deps import Auth, Rt, actor_of, request_id
from marketplace.api.errors import error_body
from marketplace.api.routes_web import SECURITY_HEADERS
from marketplace.api.schemas import KeyCreated, KeyPublic, Role
from marketplace.db.models import Org
from marketplace.errors import Conflict, NotFound
from marketplace.runtime import Runtime
from marketplace.services import audit
from marketplace.services.oidc import LoginRefused, OidcClient
from marketplace.services.sso import csrf_token as csrf_of
from marketplace.services.sso import (
    disable_user,
    finish_login,
    mint_personal_key,
    nonce_was_used,
    revoke_session,
    start_login,
    take_login,
    teams_of,
    user_of_principal,
)
from marketplace.services.sso_mapping import GroupMapError, load_group_map, map_groups
from marketplace.settings import SettingsError

__all__ = ["STATE_COOKIE", "configure_oidc", "router"]

STATE_COOKIE = "som_oidc_state"
MAPPING_REFUSALS = frozenset({"unmapped_group", "several_organisations", "unknown_organisation"})

router = APIRouter(prefix="/v1/auth", tags=["auth"])

_ERR: dict[str, Any] = {"content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
_AGENT: dict[int | str, dict[str, Any]] = {
    403: {"description": "An agent key was presented (agent protocol only)", **_ERR}
}
_NO_SSO: dict[int | str, dict[str, Any]] = {
    404: {"description": "SSO is not configured on this server", **_ERR},
    **_AGENT,
}
_CALLBACK: dict[int | str, dict[str, Any]] = {
    303: {"description": "Signed in: the session cookie is set; on to the UI"},
    400: {"description": "Refused: state missing, not this browser's, used or expired (error.reason)", **_ERR},
    401: {"description": "Refused: the code or the ID token does not verify (error.reason)", **_ERR},
    403: {"description": "Refused: the groups map to no role here (error.reason)", **_ERR},
    502: {"description": "The OpenID Provider did not answer", **_ERR},
    503: {"description": "The group mapping file cannot be read", **_ERR},
    404: _NO_SSO[404],
}


class AuthConfig(BaseModel):
    sso: bool
    login_url: str | None = None


class UserPublic(BaseModel):
    id: str
    email: str
    name: str
    teams: list[str]


class Me(BaseModel):
    via: str = Field(description="session (signed in with SSO) or api_key")
    key_id: str
    org_id: str
    org_name: str
    roles: list[str]
    user: UserPublic | None = None
    session_expires_at: datetime | None = None
    csrf_token: str | None = Field(default=None, description="Send as X-CSRF-Token with state-changing requests.")


class PersonalKeyCreate(BaseModel):
    model_config = {"extra": "forbid"}
    roles: list[Role] | None = Field(default=None, description="Default: all the session's roles.")
    name: str = Field(default="", max_length=200)
    ttl_days: int = Field(default=30, ge=1, le=3650)


def _oidc(request: Request) -> OidcClient:
    client: OidcClient | None = getattr(request.app.state, "oidc", None)
    if client is None:
        raise NotFound("SSO is not configured on this server (SOM_OIDC_ISSUER)")
    return client


def _secure(request: Request) -> bool:
    return request.url.scheme == "https"


def _redirect_uri(rt: Runtime, request: Request) -> str:
    return rt.settings.oidc_redirect_uri or str(request.base_url).rstrip("/") + "/v1/auth/callback"


def _safe_next(value: str | None) -> str:
    """Only a page of the UI on this origin (no open redirect)."""
    if value and value.startswith("/ui/") and "\\" not in value and not value.startswith("//"):
        return value[:500]
    return "/ui/"


@router.get("/config", response_model=AuthConfig, summary="Whether SSO sign-in is available", responses=_AGENT)
def auth_config(request: Request) -> AuthConfig:
    on = getattr(request.app.state, "oidc", None) is not None
    return AuthConfig(sso=on, login_url="/v1/auth/login" if on else None)


@router.get(
    "/login",
    summary="Start an SSO sign-in: redirect to the OpenID Provider",
    status_code=302,
    response_class=RedirectResponse,
    responses={
        302: {"description": "To the OP's authorization endpoint"},
        502: {"description": "The OpenID Provider did not answer (error.reason)", **_ERR},
        503: {"description": "Too many sign-ins in progress (error.reason busy)", **_ERR},
        **_NO_SSO,
    },
)
def login(request: Request, rt: Rt, next: str | None = None) -> Response:
    client = _oidc(request)
    try:
        with rt.tx() as s:
            pending = start_login(s, next_url=_safe_next(next))
    except LoginRefused as e:  # too many logins in flight: not audited (one leaf per request would be the flood)
        return _refused_response(request, e)
    try:
        url = client.authorization_url(
            redirect_uri=_redirect_uri(rt, request),
            state=pending.state,
            nonce=pending.nonce,
            code_verifier=pending.code_verifier,
        )
    except LoginRefused as e:  # the OP's discovery document is unreachable or wrong
        return _refuse(rt, request, e, {}, [])
    resp = RedirectResponse(url, status_code=302)
    resp.set_cookie(
        STATE_COOKIE,
        pending.state,
        max_age=600,
        path="/v1/auth",
        httponly=True,
        samesite="lax",
        secure=_secure(request),
    )
    return resp


def _refused_response(request: Request, e: LoginRefused) -> Response:
    if "text/html" in request.headers.get("accept", ""):
        body = (
            '<!doctype html><html lang="en"><head><meta charset="utf-8"><title>Sign-in refused</title>'
            '<link rel="stylesheet" href="/ui/style.css"></head><body><main>'
            f'<section class="panel error-panel" role="alert"><h2>Sign-in refused</h2>'
            f'<p id="refusal-reason"><code>{html.escape(e.reason)}</code></p>'
            f'<p id="refusal-message">{html.escape(e.message)}</p>'
            '<p><a href="/ui/">Back to the sign-in page</a></p></section></main></body></html>'
        )
        resp: Response = HTMLResponse(body, status_code=e.status, headers=SECURITY_HEADERS)
    else:
        code = {400: "invalid", 401: "unauthenticated", 403: "forbidden"}.get(e.status, "unavailable")
        resp = JSONResponse(error_body(code, e.message, request, reason=e.reason), status_code=e.status)
    resp.delete_cookie(STATE_COOKIE, path="/v1/auth")
    return resp


def _refuse(rt: Runtime, request: Request, e: LoginRefused, claims: dict[str, Any], groups: list[str]) -> Response:
    """Audit the refusal (and, for a known user whose groups no longer map, disable it)."""
    sub = str(claims.get("sub") or "")
    issuer = rt.settings.oidc_issuer or ""
    with rt.tx() as s:
        user = disable_user(s, issuer, sub) if sub and e.reason in MAPPING_REFUSALS else None
        who = audit.Actor(
            actor=user.id if user else (f"oidc:{sub}" if sub else "anonymous"),
            org_id=user.org_id if user else None,
            request_id=request_id(request),
        )
        if user is not None:
            audit.emit(s, who, "user.disable", target=user.id, detail={"reason": e.reason, "groups": groups[:50]})
        audit.emit(
            s,
            who,
            "auth.login.refused",
            target=user.id if user else "oidc",
            outcome="denied",
            detail={"reason": e.reason, "message": e.message, "sub": sub, "groups": groups[:50]},
        )
    return _refused_response(request, e)


def _groups(client: OidcClient, claim: str, claims: dict[str, Any], access_token: str) -> list[str]:
    raw = claims.get(claim)
    if raw is None and access_token:  # many OPs put groups only in userinfo
        info = client.userinfo(access_token)
        if info.get("sub") == claims.get("sub"):
            raw = info.get(claim)
    if isinstance(raw, str):
        raw = [raw]
    if not isinstance(raw, list):
        return []
    return [g for g in raw if isinstance(g, str)][:500]


@router.get(
    "/callback",
    summary="The OpenID Provider's redirect back (code and state)",
    status_code=303,
    response_class=RedirectResponse,
    responses=_CALLBACK,
)
def callback(request: Request, rt: Rt) -> Response:
    client = _oidc(request)
    q = request.query_params
    claims: dict[str, Any] = {}
    groups: list[str] = []
    try:
        with rt.tx() as s:
            pending = take_login(s, q.get("state"), request.cookies.get(STATE_COOKIE))
            nonce, verifier, next_url = pending.nonce, pending.code_verifier, pending.next_url
        if q.get("error"):
            raise LoginRefused("op_error", f"the OP answered {q.get('error')}: {q.get('error_description', '')}"[:300])
        if q.get("iss") is not None and q.get("iss") != client.issuer:  # RFC 9207: a mix-up with another OP
            raise LoginRefused("wrong_issuer", "the authorization response names another issuer", 400)
        code = q.get("code")
        if not code:
            raise LoginRefused("missing_code", "the callback has no code", 400)
        token = client.exchange(code=code, code_verifier=verifier, redirect_uri=_redirect_uri(rt, request))
        access_token = str(token.get("access_token") or "")
        try:
            claims = client.verify_id_token(token["id_token"], nonce=nonce, access_token=access_token or None)
        except LoginRefused as e:
            if e.reason == "nonce_mismatch" and e.presented_nonce is not None:
                with rt.tx() as s:
                    if nonce_was_used(s, e.presented_nonce):
                        raise LoginRefused(
                            "nonce_replayed", "the ID token belongs to an earlier login (replayed)"
                        ) from e
            raise
        groups = _groups(client, rt.settings.oidc_groups_claim, claims, access_token)
        assert rt.settings.oidc_group_map is not None  # checked at start (Settings.check_secrets)
        try:
            mapped = map_groups(load_group_map(rt.settings.oidc_group_map), groups)
        except GroupMapError as e:
            raise LoginRefused("mapping_unavailable", f"the group mapping cannot be read: {e}", 503) from e
        if mapped.refusal:
            raise LoginRefused(mapped.refusal, f"your groups {groups[:20]} give no role here ({mapped.refusal})", 403)
        with rt.tx() as s:
            _, session_token = finish_login(
                s,
                issuer=client.issuer,
                claims=claims,
                groups=groups,
                mapped=mapped,
                ttl_seconds=rt.settings.session_ttl_seconds,
                who=audit.Actor(actor="oidc", org_id=None, request_id=request_id(request)),
            )
    except LoginRefused as e:
        return _refuse(rt, request, e, claims, groups)
    resp = RedirectResponse(next_url, status_code=303)
    resp.set_cookie(
        SESSION_COOKIE,
        session_token,
        max_age=rt.settings.session_ttl_seconds,
        path="/",
        httponly=True,
        samesite="lax",
        secure=_secure(request),
    )
    resp.delete_cookie(STATE_COOKIE, path="/v1/auth")
    return resp


@router.get("/me", response_model=Me, summary="Who is signed in (session or API key); the CSRF token of a session")
def me(p: Auth, rt: Rt, request: Request) -> Me:
    info = getattr(request.state, "web_session", None)
    with rt.tx() as s:
        org = s.get(Org, p.org_id)
        user = user_of_principal(s, p)
        up = UserPublic(id=user.id, email=user.email, name=user.name, teams=teams_of(s, user.id)) if user else None
    return Me(
        via="session" if info else "api_key",
        key_id=p.key_id,
        org_id=p.org_id,
        org_name=org.name if org else "",
        roles=sorted(p.roles),
        user=up,
        session_expires_at=info.expires_at if info else None,
        csrf_token=csrf_of(request.cookies.get(SESSION_COOKIE, "")) if info else None,
    )


@router.post("/logout", summary="End the browser session (send X-CSRF-Token)")
def logout(p: Auth, rt: Rt, request: Request) -> Response:
    info = getattr(request.state, "web_session", None)
    if info is None:
        raise Conflict("this request is not made with a session cookie; revoke an API key with DELETE /v1/keys/{id}")
    with rt.tx() as s:
        revoke_session(s, info.session_id)
        audit.emit(s, actor_of(p, request), "auth.logout", target=p.key_id, detail={"session": info.session_id})
    resp = JSONResponse({"signed_out": True})
    resp.delete_cookie(SESSION_COOKIE, path="/", httponly=True, samesite="lax", secure=_secure(request))
    return resp


@router.post("/keys", response_model=KeyCreated, status_code=201, summary="Mint a personal API key (signed-in user)")
def personal_key(body: PersonalKeyCreate, p: Auth, rt: Rt, request: Request) -> KeyCreated:
    info = getattr(request.state, "web_session", None)
    if info is None:
        raise Conflict("personal keys are minted from an SSO session; use POST /v1/orgs/{org}/keys with a key")
    with rt.tx() as s:
        row, plaintext = mint_personal_key(
            s,
            info,
            roles=list(body.roles) if body.roles else None,
            name=body.name,
            ttl_days=body.ttl_days,
            max_days=rt.settings.oidc_personal_key_max_days,
        )
        who = actor_of(p, request)
        audit.emit(
            s, who, "key.create", target=row.id, detail={"org": row.org_id, "prefix": row.prefix, "personal": True}
        )
        audit.emit(s, who, "role.grant", target=row.id, detail={"roles": row.roles})
        return KeyCreated(**KeyPublic.model_validate(row).model_dump(), key=plaintext)


def configure_oidc(rt: Runtime, app: FastAPI) -> None:
    """With SOM_OIDC_ISSUER set: the OIDC client (discovery is fetched at the first login) and a
    check that the group mapping file parses, so a broken mapping stops the server at start."""
    s = rt.settings
    app.state.oidc = None
    if not s.oidc_issuer:
        return
    assert s.oidc_client_id and s.oidc_client_secret and s.oidc_group_map  # Settings.check_secrets
    try:
        load_group_map(s.oidc_group_map)
    except GroupMapError as e:
        raise SettingsError(str(e)) from e
    app.state.oidc = OidcClient(
        s.oidc_issuer,
        s.oidc_client_id,
        s.oidc_client_secret.get_secret_value(),
        scopes=s.oidc_scopes,
        refetch_seconds=s.oidc_jwks_refetch_seconds,
    )
