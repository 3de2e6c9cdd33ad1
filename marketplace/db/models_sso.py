"""Single sign-on tables: users (principals beside API keys), their teams, web sessions, pending logins.

For: people who sign in through the organisation's OpenID Provider (docs/sso.md). A user belongs to
one organisation and to teams, both re-derived from the IdP's groups at every login. Not for: API
keys (``api_keys``); a personal key a user mints is an ``api_keys`` row with ``created_by`` = the
user's id.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import JSON, ForeignKey, String, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from marketplace.db.base import Base, UTCDateTime, new_id, utcnow

__all__ = ["OidcLogin", "User", "UserTeam", "WebSession"]


class User(Base):
    """A person known through the IdP: (issuer, subject) is the identity, the rest is from the last login."""

    __tablename__ = "users"

    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("usr"))
    org_id: Mapped[str] = mapped_column(ForeignKey("orgs.id"), index=True)
    issuer: Mapped[str] = mapped_column(String(300))
    subject: Mapped[str] = mapped_column(String(255))
    email: Mapped[str] = mapped_column(String(320), default="")
    name: Mapped[str] = mapped_column(String(200), default="")
    roles: Mapped[list[str]] = mapped_column(JSON)  # from the groups at the last login
    groups: Mapped[list[str]] = mapped_column(JSON)  # the IdP groups presented at the last login
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    last_login_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    # Set when a later login is refused (groups no longer map): sessions and personal keys stop.
    disabled_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)

    __table_args__ = (UniqueConstraint("issuer", "subject", name="uq_users_issuer_subject"),)


class UserTeam(Base):
    """A user's membership of a team of its organisation (team by name until teams get their own table)."""

    __tablename__ = "user_teams"

    user_id: Mapped[str] = mapped_column(ForeignKey("users.id"), primary_key=True)
    team: Mapped[str] = mapped_column(String(200), primary_key=True)
    org_id: Mapped[str] = mapped_column(ForeignKey("orgs.id"), index=True)


class WebSession(Base):
    """A browser session: the cookie holds a random id; only its SHA-256 is stored."""

    __tablename__ = "web_sessions"

    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("ses"))
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    user_id: Mapped[str] = mapped_column(ForeignKey("users.id"), index=True)
    org_id: Mapped[str] = mapped_column(ForeignKey("orgs.id"))
    roles: Mapped[list[str]] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime())
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)


class OidcLogin(Base):
    """A login in flight: the state (hashed), the nonce (hashed) and the PKCE verifier; single use."""

    __tablename__ = "oidc_logins"

    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("lgn"))
    state_hash: Mapped[str] = mapped_column(String(64), unique=True)
    nonce_hash: Mapped[str] = mapped_column(String(64), index=True)
    nonce: Mapped[str] = mapped_column(String(100))
    code_verifier: Mapped[str] = mapped_column(String(128))
    next_url: Mapped[str] = mapped_column(String(500), default="/ui/")
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime())
    used_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
