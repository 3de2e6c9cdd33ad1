"""Can this process unwrap the data keys it holds? The ``kek`` field of ``GET /v1/health``.

For: an honest health check after a key rotation, a restore of the key directory, or a wrong
``SOM_KEK``: one artifact per distinct KEK id in the database has its data key unwrapped (not
its blob decrypted: the check costs one AES-GCM per KEK id). ``ok`` when every one unwraps (or
there are no artifacts), ``cannot_unwrap`` otherwise (the health route then answers 503).
Not for: checking every artifact (``som admin rotate-kek`` re-wraps them all, and fails loudly on
any that does not unwrap).
"""

from __future__ import annotations

import logging
from enum import StrEnum
from typing import Any

from sqlalchemy import func, select

from crypto.envelope import WrappedKey, rewrap
from crypto.errors import CryptoError
from marketplace.db.models import Artifact

__all__ = ["KekStatus", "kek_status"]

log = logging.getLogger("som.keys")


class KekStatus(StrEnum):
    OK = "ok"
    CANNOT_UNWRAP = "cannot_unwrap"


def kek_status(rt: Any) -> tuple[KekStatus, str | None]:
    """``(status, the KEK id that failed or None)`` for ``rt``'s key provider."""
    with rt.tx() as s:
        firsts = select(func.min(Artifact.id)).group_by(Artifact.kek_id)
        rows = s.execute(
            select(Artifact.kek_id, Artifact.wrapped_key, Artifact.aad).where(Artifact.id.in_(firsts))
        ).all()
    try:
        provider = rt.key_provider
        refresh = getattr(provider, "refresh", None)
        if refresh is not None:
            refresh()  # the keyring as on disk now (what a restart would load), not as first read
    except CryptoError as e:
        log.error("health: the key provider cannot be opened: %s", e)
        return KekStatus.CANNOT_UNWRAP, None
    for kek_id, wrapped_key, aad in rows:
        try:
            wrapped = WrappedKey.from_json(bytes(wrapped_key).decode())
            rewrap(wrapped, old=provider, new=provider, aad=str(aad).encode())  # unwrap; the result is dropped
        except (CryptoError, ValueError) as e:
            log.error("health: the data keys under KEK %s do not unwrap: %s", kek_id, type(e).__name__)
            return KekStatus.CANNOT_UNWRAP, str(kek_id)
    return KekStatus.OK, None
