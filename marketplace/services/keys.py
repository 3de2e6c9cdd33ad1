"""Key-encryption-key rotation: re-wrap every data key; blobs are not re-encrypted."""

from __future__ import annotations

from sqlalchemy import select, text
from sqlalchemy.orm import Session

from crypto.envelope import WrappedKey, rewrap
from marketplace.db.models import Artifact
from marketplace.errors import Conflict
from marketplace.runtime import Runtime
from marketplace.services import audit

__all__ = ["ROTATION_LOCK", "lock_rotation", "rotate_kek"]


#: The PostgreSQL advisory lock key of a KEK rotation (any constant; "som-kek" in ASCII).
ROTATION_LOCK = 0x736F6D2D6B656B


def lock_rotation(s: Session) -> None:
    """One rotation at a time across processes and replicas, for the rest of the transaction:
    a transaction-scoped advisory lock on PostgreSQL; on SQLite every transaction already holds
    the database's writer lock (``BEGIN IMMEDIATE``)."""
    if s.get_bind().dialect.name == "postgresql":
        s.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": ROTATION_LOCK})


def rotate_kek(rt: Runtime) -> tuple[int, str]:
    """Make a new active KEK and re-wrap every artifact's data key with it.

    Returns (number of data keys re-wrapped, new KEK id). The old KEK stays in the keyring
    until every data key has moved, so an interrupted rotation can simply be run again. Two
    rotations never interleave (:func:`lock_rotation`, and the keyring's file lock); running
    servers and workers pick up the new KEK from the keyring file without a restart.
    """
    provider = rt.key_provider
    rotate = getattr(provider, "rotate", None)  # only the local key file rotates here
    if rotate is None:
        raise Conflict("this key provider rotates outside som (set a new SOM_KEK and keep the old one for unwrapping)")
    n = 0
    with rt.tx() as s:
        lock_rotation(s)
        new_id: str = rotate()  # under the keyring's own file lock, from the file as it is now
        for art in s.scalars(select(Artifact)):
            wrapped = WrappedKey.from_json(art.wrapped_key.decode())
            if wrapped.kek_id == new_id:
                continue
            fresh = rewrap(wrapped, old=provider, new=provider, aad=art.aad.encode())
            art.wrapped_key = fresh.to_json().encode()
            art.kek_id = fresh.kek_id
            n += 1
        audit.emit(s, audit.Actor.system(), "kek.rotate", target=new_id, detail={"rewrapped": n})
    return n, new_id
