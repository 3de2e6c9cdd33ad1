"""Users, web sessions and logins in flight: what the SSO routes store and check.

For: the server side of an OIDC sign-in once :mod:`marketplace.services.oidc` has verified the ID
token: the single-use login record (state, nonce, PKCE verifier), the user (its organisation, teams
and roles re-derived from the IdP groups at every login), the session behind the browser's cookie
(only the SHA-256 of its random id is stored), the CSRF token bound to it, and personal API keys.
Every login, logout, refusal and role change is an audit event (so a ledger leaf).
Not for: HTTP (cookies, redirects: ``marketplace/api/routes_auth.py``) or the OIDC protocol.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from marketplace.db.base import utcnow
from marketplace.db.models import ApiKey, KeyKind, Org
from marketplace.db.models_sso import OidcLogin, User, UserTeam, WebSession
from marketplace.errors import Forbidden, Invalid, Unauthenticated
from marketplace.services import audit
from marketplace.services.identity import Principal, create_key
from marketplace.services.oidc import LoginRefused
from marketplace.services.sso_mapping import Mapped

__all__ = [
    "LOGIN_TTL_SECONDS",
    "Login",
    "SessionInfo",
    "check_key_owner",
    "csrf_token",
    "disable_user",
    "finish_login",
    "hash_secret",
    "mint_personal_key",
    "resolve_session",
    "revoke_session",
    "start_login",
    "take_login",
    "teams_of",
    "user_of_principal",
]

LOGIN_TTL_SECONDS = 600
MAX_PENDING_LOGINS = 10_000  # unexpired, unfinished logins at once: /v1/auth/login is unauthenticated


def hash_secret(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()


def csrf_token(session_token: str) -> str:
    """The CSRF token of a session: derived from the cookie's secret, so it needs no storage, and
    only a page that can read same-origin responses (``/v1/auth/me``) learns it."""
    digest = hashlib.sha256(b"som-csrf\x00" + session_token.encode()).digest()
    return base64.urlsafe_b64encode(digest).decode().rstrip("=")


def csrf_ok(session_token: str, presented: str | None) -> bool:
    return bool(presented) and hmac.compare_digest(csrf_token(session_token), presented or "")


@dataclass(frozen=True)
class Login:
    state: str
    nonce: str
    code_verifier: str


def start_login(session: Session, *, next_url: str, now: datetime | None = None) -> Login:
    """Record a login in flight; the state, nonce and verifier are random and single use."""
    now = now or utcnow()
    pending = session.scalar(
        select(func.count()).select_from(OidcLogin).where(OidcLogin.used_at.is_(None), OidcLogin.expires_at > now)
    )
    if (pending or 0) >= MAX_PENDING_LOGINS:
        raise LoginRefused("busy", "too many sign-ins in progress; try again in a few minutes", 503)
    login = Login(
        state=secrets.token_urlsafe(32), nonce=secrets.token_urlsafe(32), code_verifier=secrets.token_urlsafe(64)
    )
    session.add(
        OidcLogin(
            state_hash=hash_secret(login.state),
            nonce_hash=hash_secret(login.nonce),
            nonce=login.nonce,
            code_verifier=login.code_verifier,
            next_url=next_url,
            created_at=now,
            expires_at=now + timedelta(seconds=LOGIN_TTL_SECONDS),
        )
    )
    # Logins never finished are of no use after their expiry: keep the table small.
    session.execute(
        OidcLogin.__table__.delete().where(OidcLogin.expires_at < now - timedelta(days=1))  # type: ignore[attr-defined]
    )
    session.flush()
    return login


def take_login(session: Session, state: str | None, bound: str | None, *, now: datetime | None = None) -> OidcLogin:
    """The login this callback finishes, marked used. ``bound`` is the state the browser's cookie
    holds (a callback from another browser, or forged, has none or another one)."""
    if not state:
        raise LoginRefused("missing_state", "the callback has no state parameter", 400)
    if not bound or not hmac.compare_digest(bound, state):
        raise LoginRefused("state_mismatch", "the state does not belong to this browser's login", 400)
    now = now or utcnow()
    row = session.scalar(select(OidcLogin).where(OidcLogin.state_hash == hash_secret(state)))
    if row is None:
        raise LoginRefused("state_mismatch", "unknown state", 400)
    if row.used_at is not None:
        raise LoginRefused("state_replayed", "this login was already completed", 400)
    if row.expires_at <= now:
        raise LoginRefused("state_expired", "this login took too long; start again", 400)
    # Single use even if two callbacks race: only one UPDATE finds used_at still NULL.
    done = session.execute(
        update(OidcLogin).where(OidcLogin.id == row.id, OidcLogin.used_at.is_(None)).values(used_at=now)
    )
    if done.rowcount != 1:  # type: ignore[attr-defined]
        raise LoginRefused("state_replayed", "this login was already completed", 400)
    return row


def nonce_was_used(session: Session, nonce: object) -> bool:
    """Whether ``nonce`` belongs to an earlier login that already finished (an ID token replayed)."""
    if not isinstance(nonce, str) or not nonce:
        return False
    row = session.scalar(select(OidcLogin).where(OidcLogin.nonce_hash == hash_secret(nonce)))
    return row is not None and row.used_at is not None


def teams_of(session: Session, user_id: str) -> list[str]:
    return sorted(session.scalars(select(UserTeam.team).where(UserTeam.user_id == user_id)))


def disable_user(session: Session, issuer: str, subject: str, *, now: datetime | None = None) -> User | None:
    """A refused login of a known user: its roles and teams are cleared, sessions end, keys stop."""
    user = session.scalar(select(User).where(User.issuer == issuer, User.subject == subject))
    if user is None:
        return None
    now = now or utcnow()
    user.disabled_at = user.disabled_at or now
    user.roles = []
    session.execute(UserTeam.__table__.delete().where(UserTeam.user_id == user.id))  # type: ignore[attr-defined]
    session.execute(
        update(WebSession).where(WebSession.user_id == user.id, WebSession.revoked_at.is_(None)).values(revoked_at=now)
    )
    return user


def finish_login(
    session: Session,
    *,
    issuer: str,
    claims: dict[str, object],
    groups: list[str],
    mapped: Mapped,
    ttl_seconds: int,
    who: audit.Actor,
    now: datetime | None = None,
) -> tuple[User, str]:
    """Create or update the user from a verified login and open a session; returns (user, cookie value)."""
    now = now or utcnow()
    org = session.scalar(select(Org).where(Org.name == mapped.org))
    if org is None:
        raise LoginRefused(
            "unknown_organisation", f"the groups map to organisation {mapped.org!r}, which does not exist", 403
        )
    sub = str(claims["sub"])
    user = session.scalar(select(User).where(User.issuer == issuer, User.subject == sub))
    before_roles: list[str] | None = None
    before_teams: list[str] = []
    if user is None:
        user = User(org_id=org.id, issuer=issuer, subject=sub, roles=list(mapped.roles), groups=[], created_at=now)
        session.add(user)
        session.flush()
    else:
        before_roles = list(user.roles) if user.disabled_at is None and user.org_id == org.id else []
        before_teams = teams_of(session, user.id)
        if user.org_id != org.id:  # moved to another organisation: nothing of the old one stays
            session.execute(
                update(WebSession)
                .where(WebSession.user_id == user.id, WebSession.revoked_at.is_(None))
                .values(revoked_at=now)
            )
    user.org_id = org.id
    user.email = str(claims.get("email") or "")[:320]
    user.name = str(claims.get("name") or "")[:200]
    user.roles = list(mapped.roles)
    user.groups = sorted(set(groups))[:200]
    user.last_login_at = now
    user.disabled_at = None
    session.execute(UserTeam.__table__.delete().where(UserTeam.user_id == user.id))  # type: ignore[attr-defined]
    for team in mapped.teams:
        session.add(UserTeam(user_id=user.id, team=team, org_id=org.id))
    token = secrets.token_urlsafe(32)
    ws = WebSession(
        token_hash=hash_secret(token),
        user_id=user.id,
        org_id=org.id,
        roles=list(mapped.roles),
        created_at=now,
        expires_at=now + timedelta(seconds=ttl_seconds),
    )
    session.add(ws)
    session.flush()
    actor = audit.Actor(actor=user.id, org_id=org.id, request_id=who.request_id)
    if before_roles is not None and (sorted(before_roles) != list(mapped.roles) or before_teams != list(mapped.teams)):
        # The user's other sessions hold the old roles: they end, so the new ones apply everywhere.
        session.execute(
            update(WebSession)
            .where(WebSession.user_id == user.id, WebSession.id != ws.id, WebSession.revoked_at.is_(None))
            .values(revoked_at=now)
        )
        audit.emit(
            session,
            actor,
            "user.roles.change",
            target=user.id,
            detail={
                "before": sorted(before_roles),
                "after": list(mapped.roles),
                "teams_before": before_teams,
                "teams_after": list(mapped.teams),
            },
        )
    audit.emit(
        session,
        actor,
        "auth.login",
        target=user.id,
        detail={
            "sub": sub,
            "email": user.email,
            "roles": list(mapped.roles),
            "teams": list(mapped.teams),
            "groups": list(mapped.matched),
            "session": ws.id,
            "new_user": before_roles is None,
        },
    )
    return user, token


@dataclass(frozen=True)
class SessionInfo:
    principal: Principal
    session_id: str
    user_id: str
    expires_at: datetime


def resolve_session(session: Session, token: str, *, now: datetime | None = None) -> SessionInfo:
    """The principal behind a session cookie, or :class:`Unauthenticated`."""
    now = now or utcnow()
    ws = session.scalar(select(WebSession).where(WebSession.token_hash == hash_secret(token)))
    if ws is None or ws.revoked_at is not None or ws.expires_at <= now:
        raise Unauthenticated("no valid session: sign in again")
    user = session.get(User, ws.user_id)
    if user is None or user.disabled_at is not None or user.org_id != ws.org_id:
        raise Unauthenticated("no valid session: sign in again")
    p = Principal(key_id=user.id, org_id=ws.org_id, roles=frozenset(ws.roles), kind=KeyKind.USER)
    return SessionInfo(principal=p, session_id=ws.id, user_id=user.id, expires_at=ws.expires_at)


def revoke_session(session: Session, session_id: str, *, now: datetime | None = None) -> None:
    session.execute(
        update(WebSession)
        .where(WebSession.id == session_id, WebSession.revoked_at.is_(None))
        .values(revoked_at=now or utcnow())
    )


def mint_personal_key(
    session: Session,
    info: SessionInfo,
    *,
    roles: list[str] | None,
    name: str,
    ttl_days: int,
    max_days: int,
    now: datetime | None = None,
) -> tuple[ApiKey, str]:
    """A key for the signed-in user: roles within the session's, lifetime within ``max_days``.
    It is the user's (``user_id``): it stops when the user is refused at a later login or no
    longer holds its roles (:func:`check_key_owner`)."""
    wanted = sorted(set(roles)) if roles else sorted(info.principal.roles)
    extra = set(wanted) - set(info.principal.roles)
    if extra:
        raise Forbidden(f"you cannot grant roles you do not hold: {sorted(extra)}")
    if not 1 <= ttl_days <= max_days:
        raise Invalid(f"a personal key lives 1..{max_days} days, got {ttl_days}")
    return create_key(
        session,
        org_id=info.principal.org_id,
        roles=wanted,
        name=name or "personal key",
        ttl_days=ttl_days,
        user_id=info.user_id,
        now=now,
    )


def check_key_owner(session: Session, p: Principal) -> None:
    """A personal key works only while its user is active in the key's organisation and holds its roles."""
    row = session.get(ApiKey, p.key_id)
    if row is None or row.user_id is None:
        return
    user = session.get(User, row.user_id)
    if (
        user is None
        or user.disabled_at is not None
        or user.org_id != row.org_id
        or not set(row.roles) <= set(user.roles)
    ):
        raise Unauthenticated("this personal key's user no longer holds its roles: sign in again and mint a new key")


def user_of_principal(session: Session, p: Principal) -> User | None:
    """The user a principal is (a session) or acts for (a personal key)."""
    if p.key_id.startswith("usr_"):
        return session.get(User, p.key_id)
    row = session.get(ApiKey, p.key_id)
    if row is not None and row.user_id is not None:
        return session.get(User, row.user_id)
    return None
