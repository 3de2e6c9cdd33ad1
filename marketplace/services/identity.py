"""Organisations, roles and API keys.

API keys look like ``som_<prefix>_<secret>``: the prefix identifies the key (shown in lists and
audit events), the whole key is stored only as an argon2id hash, and the key is shown once.
Verifying argon2id on every request would cost ~20 ms, so a verified key's SHA-256 is cached in
process memory for a short time; revocation and expiry are still checked on every request.
"""

from __future__ import annotations

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
from marketplace.db.models import ApiKey, Org
from marketplace.errors import Conflict, Forbidden, Invalid, NotFound, Unauthenticated

__all__ = [
    "ROLES",
    "Principal",
    "authenticate",
    "bootstrap",
    "create_key",
    "create_org",
    "revoke_key",
]

ROLES = ("provider", "consumer", "compliance", "admin")
_HASHER = PasswordHasher(time_cost=2, memory_cost=19456, parallelism=1)  # OWASP argon2id minimum
_CACHE_TTL = 60.0
_cache: dict[bytes, tuple[str, float]] = {}
_cache_lock = threading.Lock()


@dataclass(frozen=True)
class Principal:
    """Who is calling: the key, its organisation, its roles."""

    key_id: str
    org_id: str
    roles: frozenset[str]
    kind: str = "user"
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
    kind: str = "user",
    offering_ids: list[str] | None = None,
    created_by: str | None = None,
    now: datetime | None = None,
) -> tuple[ApiKey, str]:
    """Create a key; returns the row and the plaintext key (shown once, never stored)."""
    if session.get(Org, org_id) is None:
        raise NotFound(f"organisation {org_id} not found")
    if not 1 <= ttl_days <= 3650:
        raise Invalid(f"ttl_days must be in 1..3650, got {ttl_days}")
    now = now or utcnow()
    prefix = secrets.token_hex(6)
    plaintext = f"som_{prefix}_{secrets.token_urlsafe(32)}"
    row = ApiKey(
        org_id=org_id,
        prefix=prefix,
        hash=_HASHER.hash(plaintext),
        roles=_check_roles(roles),
        name=name,
        kind=kind,
        offering_ids=offering_ids,
        expires_at=now + timedelta(days=ttl_days),
        created_by=created_by,
        created_at=now,
    )
    session.add(row)
    session.flush()
    return row, plaintext


def revoke_key(session: Session, key: ApiKey, *, now: datetime | None = None) -> None:
    if key.revoked_at is not None:
        raise Conflict(f"key {key.id} is already revoked")
    key.revoked_at = now or utcnow()
    with _cache_lock:
        for k, (kid, _) in list(_cache.items()):
            if kid == key.id:
                del _cache[k]


def authenticate(session: Session, presented: str | None, *, now: datetime | None = None) -> Principal:
    """Map a presented API key to a :class:`Principal` or raise :class:`Unauthenticated`."""
    if not presented:
        raise Unauthenticated("missing API key: send 'Authorization: Bearer som_...'")
    parts = presented.split("_", 2)
    if len(parts) != 3 or parts[0] != "som" or not parts[1]:
        raise Unauthenticated("malformed API key")
    row = session.scalar(select(ApiKey).where(ApiKey.prefix == parts[1]))
    if row is None:
        raise Unauthenticated("unknown API key")
    now = now or utcnow()
    if row.revoked_at is not None:
        raise Unauthenticated("API key revoked")
    if row.expires_at <= now:
        raise Unauthenticated("API key expired")
    digest = hashlib.sha256(presented.encode()).digest()
    mono = time.monotonic()
    with _cache_lock:
        hit = _cache.get(digest)
    if not (hit and hit[0] == row.id and hit[1] > mono):
        try:
            _HASHER.verify(row.hash, presented)
        except (VerifyMismatchError, VerificationError, InvalidHashError) as e:
            raise Unauthenticated("unknown API key") from e
        with _cache_lock:
            if len(_cache) > 10_000:
                _cache.clear()
            _cache[digest] = (row.id, mono + _CACHE_TTL)
    return Principal(
        key_id=row.id,
        org_id=row.org_id,
        roles=frozenset(row.roles),
        kind=row.kind,
        offering_ids=frozenset(row.offering_ids) if row.offering_ids is not None else None,
    )


def bootstrap(session: Session, *, org_name: str = "operator", now: datetime | None = None) -> tuple[ApiKey, str]:
    """Create the operator organisation and its first admin key. Refuses if an admin key exists."""
    existing = [k for k in session.scalars(select(ApiKey)) if "admin" in k.roles and k.revoked_at is None]
    if existing:
        raise Conflict("an admin key already exists; create further keys with it (som key create)")
    org = session.scalar(select(Org).where(Org.name == org_name)) or create_org(session, org_name)
    return create_key(session, org_id=org.id, roles=["admin"], name="bootstrap admin", now=now)
