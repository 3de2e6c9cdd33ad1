"""Organisations, roles and API keys.

API keys look like ``som_<prefix>_<secret>``: the prefix identifies the key (shown in lists and
audit events), the whole key is stored only as an argon2id hash, and the key is shown once.
Verifying argon2id on every request would cost ~20 ms, so a verified key's SHA-256 is cached in
process memory for a short time; revocation and expiry are still checked on every request.

Every bad key gets one answer (:class:`KeyRefused`, one message) after one argon2 verification:
an unknown prefix is verified against a dummy hash, and a revoked or expired key is told so only
in the audit reason, after its secret verified. Keys have a lineage: ``created_by`` is the id of
the key that created it; a key cannot create one that outlives it or holds more, an agent key
creates none, and revoking a key revokes every key below it (docs/authentication.md).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import secrets
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timedelta

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError
from sqlalchemy import select
from sqlalchemy.orm import Session

from marketplace.db.base import utcnow
from marketplace.db.models import ApiKey, KeyKind, Org
from marketplace.errors import Conflict, Forbidden, Invalid, NotFound, Unauthenticated

__all__ = [
    "INVALID_KEY",
    "ROLES",
    "KeyRefused",
    "Principal",
    "authenticate",
    "bootstrap",
    "create_key",
    "create_org",
    "key_prefix",
    "revoke_key",
]

ROLES = ("provider", "consumer", "compliance", "admin")
_HASHER = PasswordHasher(time_cost=2, memory_cost=19456, parallelism=1)  # OWASP argon2id minimum
_CACHE_TTL = 60.0
_cache: dict[bytes, tuple[str, float]] = {}
_cache_lock = threading.Lock()

#: The one message for every presented key that does not authenticate (unknown, wrong secret,
#: revoked, expired, malformed): the client cannot tell them apart.
INVALID_KEY = "invalid API key"


class KeyRefused(Unauthenticated):
    """A presented key did not authenticate. ``reason`` is for the audit log only, never the client
    (``malformed``, ``unknown``, ``wrong_secret``, ``revoked``, ``expired``)."""

    def __init__(self, reason: str) -> None:
        super().__init__(INVALID_KEY)
        self.reason = reason


@functools.cache
def _dummy_hash() -> str:
    """An argon2id hash of a random secret nobody knows, with the live parameters (made on first use)."""
    return _HASHER.hash(secrets.token_urlsafe(32))


def key_prefix(presented: str) -> str:
    """The prefix a presented ``som_<prefix>_<secret>`` names (at most 12 characters), or ""."""
    if presented.count("_") >= 2:
        return presented.split("_", 2)[1][:12]
    return ""


@dataclass(frozen=True)
class Principal:
    """Who is calling: the key, its organisation, its roles."""

    key_id: str
    org_id: str
    roles: frozenset[str]
    kind: KeyKind = KeyKind.USER
    offering_ids: frozenset[str] | None = None

    def has(self, role: str) -> bool:
        return role in self.roles

    def require(self, *roles: str) -> None:
        if not any(r in self.roles for r in roles):
            raise Forbidden(f"this action needs one of the roles {', '.join(roles)}")


def _check_roles(roles: list[str]) -> list[str]:
    bad = [r for r in roles if r not in ROLES]
    if bad or not roles:
        raise Invalid(f"roles must be a non-empty subset of {list(ROLES)}, got {roles}")
    return sorted(set(roles))


def create_org(session: Session, name: str) -> Org:
    name = name.strip()
    if not name or len(name) > 200:
        raise Invalid("organisation name must be 1..200 characters")
    if session.scalar(select(Org).where(Org.name == name)) is not None:
        raise Conflict(f"an organisation named {name!r} already exists")
    org = Org(name=name)
    session.add(org)
    session.flush()
    return org


def create_key(
    session: Session,
    *,
    org_id: str,
    roles: list[str],
    name: str = "",
    ttl_days: int = 365,
    kind: KeyKind | str = KeyKind.USER,
    offering_ids: list[str] | None = None,
    created_by: str | None = None,
    user_id: str | None = None,
    now: datetime | None = None,
) -> tuple[ApiKey, str]:
    """Create a key; returns the row and the plaintext key (shown once, never stored).

    ``created_by`` is the id of the creating key (None only for :func:`bootstrap`). The new key
    expires no later than its creator; a non-admin creator grants only roles it holds, in its own
    organisation; an agent key, or a creator that is not live, creates nothing (Forbidden).
    ``user_id`` makes a signed-in user's personal key instead (no creating key: the caller,
    :func:`marketplace.services.sso.mint_personal_key`, bounds its roles and lifetime).
    """
    if session.get(Org, org_id) is None:
        raise NotFound(f"organisation {org_id} not found")
    if not 1 <= ttl_days <= 3650:
        raise Invalid(f"ttl_days must be in 1..3650, got {ttl_days}")
    now = now or utcnow()
    expires_at = now + timedelta(days=ttl_days)
    if created_by is not None:
        parent = session.get(ApiKey, created_by)
        if parent is None or parent.revoked_at is not None or parent.expires_at <= now:
            raise Forbidden("the creating key is not live")
        if parent.kind == KeyKind.AGENT:
            raise Forbidden("an agent key cannot create keys")
        if "admin" not in parent.roles:
            if org_id != parent.org_id:
                raise Forbidden("a key creates keys only in its own organisation")
            extra = set(roles) - set(parent.roles)
            if extra:
                raise Forbidden(f"you cannot grant roles you do not hold: {sorted(extra)}")
        expires_at = min(expires_at, parent.expires_at)
    prefix = secrets.token_hex(6)
    plaintext = f"som_{prefix}_{secrets.token_urlsafe(32)}"
    row = ApiKey(
        org_id=org_id,
        prefix=prefix,
        hash=_HASHER.hash(plaintext),
        roles=_check_roles(roles),
        name=name,
        kind=KeyKind(kind),
        offering_ids=offering_ids,
        expires_at=expires_at,
        created_by=created_by,
        user_id=user_id,
        created_at=now,
    )
    session.add(row)
    session.flush()
    return row, plaintext


def revoke_key(session: Session, key: ApiKey, *, now: datetime | None = None) -> list[ApiKey]:
    """Revoke ``key`` and, recursively, every live key it created; returns those descendants.

    Raises Conflict if ``key`` is already revoked.
    """
    if key.revoked_at is not None:
        raise Conflict(f"key {key.id} is already revoked")
    now = now or utcnow()
    key.revoked_at = now
    revoked = {key.id}
    below: list[ApiKey] = []
    frontier = [key.id]
    while frontier:
        children = session.scalars(select(ApiKey).where(ApiKey.created_by.in_(frontier))).all()
        frontier = []
        for child in children:
            if child.id in revoked:
                continue
            revoked.add(child.id)
            frontier.append(child.id)
            if child.revoked_at is None:
                child.revoked_at = now
                below.append(child)
    session.flush()
    with _cache_lock:
        for k, (kid, _) in list(_cache.items()):
            if kid in revoked:
                del _cache[k]
    return below


def authenticate(session: Session, presented: str | None, *, now: datetime | None = None) -> Principal:
    """Map a presented API key to a :class:`Principal`.

    Raises :class:`Unauthenticated` if no key is presented, and :class:`KeyRefused` (one message,
    after one argon2 verification whatever the cause) if the key is malformed, unknown, has the
    wrong secret, or is revoked or expired. The secret is checked before anything else is said.
    """
    if not presented:
        raise Unauthenticated("missing API key: send 'Authorization: Bearer som_...'")
    parts = presented.split("_", 2)
    well_formed = len(parts) == 3 and parts[0] == "som" and bool(parts[1])
    row = session.scalar(select(ApiKey).where(ApiKey.prefix == parts[1])) if well_formed else None
    if row is None:
        with contextlib.suppress(VerifyMismatchError, VerificationError, InvalidHashError):
            _HASHER.verify(_dummy_hash(), presented)  # the same work as for a known prefix
        raise KeyRefused("unknown" if well_formed else "malformed")
    now = now or utcnow()
    live = row.revoked_at is None and row.expires_at > now
    digest = hashlib.sha256(presented.encode()).digest()
    mono = time.monotonic()
    hit = None
    if live:  # a revoked or expired key pays the full verification, as an unknown one does
        with _cache_lock:
            hit = _cache.get(digest)
    if not (hit and hit[0] == row.id and hit[1] > mono):
        try:
            _HASHER.verify(row.hash, presented)
        except (VerifyMismatchError, VerificationError, InvalidHashError) as e:
            raise KeyRefused("wrong_secret") from e
        if live:
            with _cache_lock:
                if len(_cache) > 10_000:
                    _cache.clear()
                _cache[digest] = (row.id, mono + _CACHE_TTL)
    if row.revoked_at is not None:
        raise KeyRefused("revoked")
    if not live:
        raise KeyRefused("expired")
    return Principal(
        key_id=row.id,
        org_id=row.org_id,
        roles=frozenset(row.roles),
        kind=row.kind,
        offering_ids=frozenset(row.offering_ids) if row.offering_ids is not None else None,
    )


def bootstrap(session: Session, *, org_name: str = "operator", now: datetime | None = None) -> tuple[ApiKey, str]:
    """Create the operator organisation and an admin key without a parent. Refuses if a live
    (neither revoked nor expired) admin key exists."""
    t = now or utcnow()
    existing = [
        k for k in session.scalars(select(ApiKey)) if "admin" in k.roles and k.revoked_at is None and k.expires_at > t
    ]
    if existing:
        raise Conflict("an admin key already exists; create further keys with it (som key create)")
    org = session.scalar(select(Org).where(Org.name == org_name)) or create_org(session, org_name)
    return create_key(session, org_id=org.id, roles=["admin"], name="bootstrap admin", now=now)
