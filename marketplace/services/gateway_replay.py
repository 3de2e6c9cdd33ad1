"""The gateway's stored answers (for idempotent replays), sealed so a DB reader cannot read them.

For: :mod:`marketplace.services.gateway`. Metering keeps the first answer of each
Idempotency-Key so a retry replays it; for plaintext predictions that would put consumer outputs
in the DB in the clear. Instead the stored bytes are AES-256-GCM under a key derived (HKDF-SHA256)
from the Idempotency-Key and the organisation, with the request digest as AAD. The marketplace
stores only the key's SHA-256, so the answer opens only when the consumer retries with the key.
A guessable key (``"1"``) gives a guessable seal: use random keys (the SDK and CLI send UUIDs).
"""

from __future__ import annotations

import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from marketplace.errors import Conflict

__all__ = ["open_answer", "seal_answer"]


def _replay_key(idempotency_key: str, org_id: str) -> bytes:
    """The key the stored answer is sealed with: derived from the Idempotency-Key, which the
    marketplace never stores (only its SHA-256), so a stored answer opens only on a retry."""
    hkdf = HKDF(algorithm=hashes.SHA256(), length=32, salt=b"som.gateway.replay/v1", info=org_id.encode())
    return hkdf.derive(idempotency_key.encode())


def seal_answer(body: bytes, *, idempotency_key: str, org_id: str, request_digest: str) -> bytes:
    """AES-256-GCM of the answer under :func:`_replay_key`; the request digest is the AAD."""
    nonce = os.urandom(12)
    return b"sgw1" + nonce + AESGCM(_replay_key(idempotency_key, org_id)).encrypt(nonce, body, request_digest.encode())


def open_answer(stored: bytes, *, idempotency_key: str, org_id: str, request_digest: str) -> bytes:
    if stored[:4] != b"sgw1" or len(stored) < 4 + 12 + 16:
        raise Conflict("the stored answer of this Idempotency-Key is unreadable; use a new key")
    try:
        return AESGCM(_replay_key(idempotency_key, org_id)).decrypt(stored[4:16], stored[16:], request_digest.encode())
    except InvalidTag:
        raise Conflict("the stored answer of this Idempotency-Key does not open; use a new key") from None
