"""Key-encryption-key rotation: re-wrap every data key; blobs are not re-encrypted."""

from __future__ import annotations

from sqlalchemy import select

from crypto.envelope import WrappedKey, rewrap
from marketplace.db.models import Artifact
from marketplace.errors import Conflict
from marketplace.runtime import Runtime
from marketplace.services import audit

__all__ = ["rotate_kek"]


def rotate_kek(rt: Runtime) -> tuple[int, str]:
    """Make a new active KEK and re-wrap every artifact's data key with it.

    Returns (number of data keys re-wrapped, new KEK id). The old KEK stays in the keyring
    until every data key has moved, so an interrupted rotation can simply be run again.
    """
    provider = rt.key_provider
    rotate = getattr(provider, "rotate", None)  # only the local key file rotates here
    if rotate is None:
        raise Conflict("this key provider rotates outside som (set a new SOM_KEK and keep the old one for unwrapping)")
    new_id: str = rotate()
    n = 0
    with rt.tx() as s:
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
