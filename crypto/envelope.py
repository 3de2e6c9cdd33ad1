"""Envelope encryption of model artifacts at rest.

For: encrypting a model artifact version for storage (blob store + DB row), decrypting it in a
worker's memory, and rotating key-encryption keys (KEKs) without touching the blobs.
Not for: data in transit between consumer and compute site (see :mod:`crypto.sealing`),
or keeping KEKs (see :mod:`crypto.keyproviders`).

Scheme (see docs/crypto-at-rest.md):

* a fresh 256-bit data key (DEK) per artifact version;
* ``blob = MAGIC || nonce(12) || AES-256-GCM(DEK, nonce, plaintext, MAGIC || aad)``;
* ``WrappedKey(kek_id, alg, wrapped)`` with ``wrapped = provider.wrap(DEK, aad=...)``, stored in
  the DB apart from the blob; the wrap is bound to the same ``aad``;
* :func:`rewrap` moves a DEK from one KEK to another; the blob stays byte-for-byte the same.

``aad`` binds the artifact identity (use :func:`artifact_aad`): a blob or a wrapped key moved
onto another artifact's row does not decrypt. Every failure to authenticate raises one opaque
:class:`crypto.errors.DecryptionError`; a KEK that the provider does not hold raises
:class:`crypto.errors.KeyMaterialError` (a configuration problem, not a forgery).
"""

from __future__ import annotations

import base64
import binascii
import json
import os
from collections.abc import Callable
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from crypto.canonical import canonicalize
from crypto.errors import DecryptionError
from crypto.keyproviders import KeyProvider

__all__ = [
    "BLOB_ALG",
    "WrappedKey",
    "artifact_aad",
    "decrypt_artifact",
    "encrypt_artifact",
    "rewrap",
]

BLOB_ALG = "A256GCM"
_MAGIC = b"SOMENV\x01"  # format name + version 1
_DEK_LEN = 32
_NONCE_LEN = 12
_TAG_LEN = 16
_DEK_AAD_DOMAIN = b"som/dek/v1\x00"
# AES-GCM limit per (key, nonce): 2^39 - 256 bits of plaintext (NIST SP 800-38D §5.2.1.1).
_MAX_PLAINTEXT = (1 << 36) - 32


@dataclass(frozen=True)
class WrappedKey:
    """A DEK wrapped under a KEK: what goes in the DB next to the blob address."""

    kek_id: str
    alg: str
    wrapped: bytes

    def __post_init__(self) -> None:
        if not isinstance(self.kek_id, str) or not self.kek_id:
            raise ValueError(f"kek_id must be a non-empty str, got {self.kek_id!r}")
        if not isinstance(self.alg, str) or not self.alg:
            raise ValueError(f"alg must be a non-empty str, got {self.alg!r}")
        if not isinstance(self.wrapped, bytes):
            raise TypeError(f"wrapped must be bytes, got {type(self.wrapped).__name__}")

    def __repr__(self) -> str:
        return f"WrappedKey(kek_id={self.kek_id!r}, alg={self.alg!r}, wrapped=<{len(self.wrapped)} bytes>)"

    def to_json(self) -> str:
        """Canonical JSON text ``{"alg":..,"kek_id":..,"wrapped":<base64>}``."""
        obj = {"alg": self.alg, "kek_id": self.kek_id, "wrapped": base64.b64encode(self.wrapped).decode()}
        return canonicalize(obj).decode()

    @classmethod
    def from_json(cls, text: str | bytes) -> WrappedKey:
        """Parse :meth:`to_json` output. Raises ValueError if malformed."""
        try:
            obj = json.loads(text)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError("wrapped key is not JSON") from e
        if not isinstance(obj, dict) or set(obj) != {"alg", "kek_id", "wrapped"}:
            got = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
            raise ValueError(f"wrapped key must have keys alg, kek_id, wrapped; got {got}")
        if not isinstance(obj["wrapped"], str):
            raise ValueError("wrapped key field 'wrapped' must be base64 text")
        try:
            raw = base64.b64decode(obj["wrapped"], validate=True)
        except binascii.Error as e:
            raise ValueError("wrapped key field 'wrapped' is not valid base64") from e
        return cls(kek_id=obj["kek_id"], alg=obj["alg"], wrapped=raw)


def artifact_aad(version_id: str, plaintext_digest: str) -> bytes:
    """The associated data binding an artifact version: canonical JSON of its id and digest."""
    if not isinstance(version_id, str) or not version_id:
        raise ValueError(f"version_id must be a non-empty str, got {version_id!r}")
    if not isinstance(plaintext_digest, str) or not plaintext_digest.startswith("sha256:"):
        raise ValueError(f"plaintext_digest must look like 'sha256:<hex>', got {plaintext_digest!r}")
    return canonicalize({"artifact_version": version_id, "digest": plaintext_digest})


def _dek_aad(alg: str, aad: bytes) -> bytes:
    return _DEK_AAD_DOMAIN + alg.encode() + b"\x00" + aad


def _check_inputs(aad: object) -> bytes:
    if not isinstance(aad, bytes):
        raise TypeError(f"aad must be bytes, got {type(aad).__name__}")
    if not aad:
        raise ValueError("aad must bind the artifact identity (see artifact_aad), got b''")
    return aad


def encrypt_artifact(
    plaintext: bytes,
    *,
    provider: KeyProvider,
    aad: bytes,
    rng: Callable[[int], bytes] = os.urandom,
) -> tuple[bytes, WrappedKey]:
    """Encrypt ``plaintext`` under a fresh DEK; wrap the DEK with ``provider``'s active KEK.

    Returns ``(blob, wrapped_key)``: store the blob (e.g. in the blob store) and the wrapped key
    (e.g. ``wrapped_key.to_json()`` in the DB) apart. Raises TypeError/ValueError on bad input.
    """
    if not isinstance(plaintext, bytes | bytearray | memoryview):
        raise TypeError(f"plaintext must be bytes, got {type(plaintext).__name__}")
    aad = _check_inputs(aad)
    if len(plaintext) > _MAX_PLAINTEXT:
        raise ValueError(f"plaintext must be at most {_MAX_PLAINTEXT} bytes, got {len(plaintext)}")
    dek = rng(_DEK_LEN)
    nonce = rng(_NONCE_LEN)
    if len(dek) != _DEK_LEN or len(nonce) != _NONCE_LEN:
        raise ValueError("rng returned the wrong number of bytes")
    body = AESGCM(dek).encrypt(nonce, bytes(plaintext), _MAGIC + aad)
    kek_id, wrapped = _wrap(provider, dek, _dek_aad(BLOB_ALG, aad))
    return _MAGIC + nonce + body, WrappedKey(kek_id=kek_id, alg=BLOB_ALG, wrapped=wrapped)


def _wrap(provider: KeyProvider, dek: bytes, aad: bytes) -> tuple[str, bytes]:
    """``(kek id, wrapped DEK)`` from one look at the provider: a provider whose active KEK can
    change under a running process (a keyring reloaded after a rotation) has ``wrap_with_id``, so
    the recorded id is the id of the KEK that wrapped."""
    both = getattr(provider, "wrap_with_id", None)
    if both is not None:
        kek_id, wrapped = both(dek, aad=aad)
        return str(kek_id), bytes(wrapped)
    wrapped = provider.wrap(dek, aad=aad)
    return provider.kek_id, wrapped


def decrypt_artifact(ciphertext: bytes, wrapped: WrappedKey, *, provider: KeyProvider, aad: bytes) -> bytes:
    """Unwrap the DEK and decrypt the blob.

    Raises DecryptionError (opaque) if the blob, the wrapped key or ``aad`` was altered or the
    KEK is wrong; KeyMaterialError if ``provider`` holds no KEK ``wrapped.kek_id``;
    TypeError/ValueError on bad input.
    """
    if not isinstance(ciphertext, bytes):
        raise TypeError(f"ciphertext must be bytes, got {type(ciphertext).__name__}")
    if not isinstance(wrapped, WrappedKey):
        raise TypeError(f"wrapped must be a WrappedKey, got {type(wrapped).__name__}")
    aad = _check_inputs(aad)
    if wrapped.alg != BLOB_ALG:
        raise ValueError(f"unsupported blob algorithm: expected {BLOB_ALG!r}, got {wrapped.alg!r}")
    if len(ciphertext) < len(_MAGIC) + _NONCE_LEN + _TAG_LEN or not ciphertext.startswith(_MAGIC):
        raise DecryptionError("artifact did not decrypt")
    dek = provider.unwrap(wrapped.wrapped, kek_id=wrapped.kek_id, aad=_dek_aad(wrapped.alg, aad))
    if len(dek) != _DEK_LEN:
        raise DecryptionError("artifact did not decrypt")
    start = len(_MAGIC)
    nonce, body = ciphertext[start : start + _NONCE_LEN], ciphertext[start + _NONCE_LEN :]
    try:
        return AESGCM(dek).decrypt(nonce, body, _MAGIC + aad)
    except InvalidTag as e:
        raise DecryptionError("artifact did not decrypt") from e


def rewrap(wrapped: WrappedKey, *, old: KeyProvider, new: KeyProvider, aad: bytes) -> WrappedKey:
    """Move a DEK from ``old``'s KEK to ``new``'s active KEK. The blob is not needed nor changed.

    ``aad`` is the artifact's associated data (the wrap is bound to it). Raises as
    :func:`decrypt_artifact` does if the wrapped key does not unwrap.
    """
    if not isinstance(wrapped, WrappedKey):
        raise TypeError(f"wrapped must be a WrappedKey, got {type(wrapped).__name__}")
    aad = _check_inputs(aad)
    dek_aad = _dek_aad(wrapped.alg, aad)
    dek = old.unwrap(wrapped.wrapped, kek_id=wrapped.kek_id, aad=dek_aad)
    kek_id, again = _wrap(new, dek, dek_aad)
    return WrappedKey(kek_id=kek_id, alg=wrapped.alg, wrapped=again)
