"""Ed25519 signing keys with stable text encodings.

For: signing offers, acceptances, ledger checkpoints; turning keys into text that travels in
JSON and back. Not for: the C2SP note format itself (see :mod:`crypto.note`).

Public keys travel as ``ed25519:<base64 of the 32 raw bytes>``; signatures as base64 of the
64 raw bytes. :func:`verify` returns ``None`` or raises :class:`crypto.errors.InvalidSignature`.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature as _CryptoInvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from crypto.errors import InvalidSignature, KeyMaterialError

__all__ = ["SigningKey", "VerifyKey", "verify"]

_PREFIX = "ed25519:"


@dataclass(frozen=True)
class VerifyKey:
    """An Ed25519 public key."""

    raw: bytes

    def __post_init__(self) -> None:
        if len(self.raw) != 32:
            raise ValueError(f"Ed25519 public key must be 32 bytes, got {len(self.raw)}")

    def to_text(self) -> str:
        return _PREFIX + base64.b64encode(self.raw).decode()

    @classmethod
    def from_text(cls, text: str) -> VerifyKey:
        if not isinstance(text, str) or not text.startswith(_PREFIX):
            raise KeyMaterialError("public key must look like 'ed25519:<base64>'")
        try:
            raw = base64.b64decode(text[len(_PREFIX) :], validate=True)
        except binascii.Error as e:
            raise KeyMaterialError("public key is not valid base64") from e
        if len(raw) != 32:
            raise KeyMaterialError("public key must decode to 32 bytes")
        return cls(raw)

    def verify(self, signature: bytes, message: bytes) -> None:
        """Return ``None`` if ``signature`` is valid for ``message``; raise otherwise."""
        try:
            Ed25519PublicKey.from_public_bytes(self.raw).verify(signature, message)
        except (_CryptoInvalidSignature, ValueError) as e:
            raise InvalidSignature("signature did not verify") from e


class SigningKey:
    """An Ed25519 private key. Never serialized implicitly: use :meth:`unsafe_private_bytes`."""

    __slots__ = ("_key",)

    def __init__(self, key: Ed25519PrivateKey) -> None:
        self._key = key

    @classmethod
    def generate(cls) -> SigningKey:
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def from_private_bytes(cls, raw: bytes) -> SigningKey:
        if len(raw) != 32:
            raise KeyMaterialError(f"Ed25519 private key must be 32 bytes, got {len(raw)}")
        return cls(Ed25519PrivateKey.from_private_bytes(raw))

    def unsafe_private_bytes(self) -> bytes:
        """The 32-byte seed. Only for writing to a 0600 key file."""
        return self._key.private_bytes(
            serialization.Encoding.Raw,
            serialization.PrivateFormat.Raw,
            serialization.NoEncryption(),
        )

    @property
    def verify_key(self) -> VerifyKey:
        return VerifyKey(
            self._key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        )

    def sign(self, message: bytes) -> bytes:
        return self._key.sign(message)

    def __repr__(self) -> str:
        return f"SigningKey(public={self.verify_key.to_text()})"


def verify(public_key: VerifyKey | str, signature_b64: str, message: bytes) -> None:
    """Verify a base64 signature over ``message``; ``None`` or :class:`InvalidSignature`."""
    key = VerifyKey.from_text(public_key) if isinstance(public_key, str) else public_key
    try:
        sig = base64.b64decode(signature_b64, validate=True)
    except (binascii.Error, TypeError, ValueError) as e:
        raise InvalidSignature("signature did not verify") from e
    key.verify(sig, message)
