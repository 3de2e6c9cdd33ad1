"""End-to-end sealed payloads for remote jobs (HPKE, RFC 9180, base mode).

For: a consumer sealing job input to a compute site's public key, and the compute site sealing
the result to the consumer's reply key, so that the marketplace relays opaque bytes.
Not for: data at rest (see :mod:`crypto.envelope`), or authenticating the sender (base mode
is anonymous: sign the sealed bytes with :mod:`crypto.signing` if the recipient must know
who sent them).

Suite: DHKEM(X25519, HKDF-SHA256), HKDF-SHA256, ChaCha20-Poly1305 (RFC 9180 §7), via
``cryptography.hazmat.primitives.hpke``. Its public API takes ``info`` but no per-message
``aad``, so both are bound through the HPKE ``info`` (it enters the key schedule, RFC 9180 §5.1)::

    hpke_info = DOMAIN || header || SHA-256(u32(len(info)) || info || aad)

Framing (version 1)::

    blob = b"SOMSEAL" || 0x01 (version) || 0x01 (suite) || enc (32) || ct

The header is bound into ``hpke_info``, so it cannot be swapped either.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from dataclasses import dataclass
from typing import Literal

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hpke, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

from crypto.errors import DecryptionError, KeyMaterialError

__all__ = [
    "DEFAULT_MAX_SIZE",
    "SealKeyPair",
    "SealPublicKey",
    "job_info",
    "open_sealed",
    "seal",
]

_PREFIX = "x25519:"
_MAGIC = b"SOMSEAL"
_VERSION = 1
_SUITE_X25519_SHA256_CHACHA = 1
_HEADER = _MAGIC + bytes([_VERSION, _SUITE_X25519_SHA256_CHACHA])
_ENC_LEN = 32
_TAG_LEN = 16
_DOMAIN = b"som/seal/v1\x00"
_SUITE = hpke.Suite(hpke.KEM.X25519, hpke.KDF.HKDF_SHA256, hpke.AEAD.CHACHA20_POLY1305)
DEFAULT_MAX_SIZE = 256 * 1024 * 1024
"""Largest sealed blob :func:`open_sealed` accepts unless told otherwise (256 MiB)."""


@dataclass(frozen=True)
class SealPublicKey:
    """An X25519 public key that payloads are sealed to. Text form ``x25519:<base64>``."""

    raw: bytes

    def __post_init__(self) -> None:
        if not isinstance(self.raw, bytes) or len(self.raw) != 32:
            got = len(self.raw) if isinstance(self.raw, bytes) else type(self.raw).__name__
            raise ValueError(f"X25519 public key must be 32 bytes, got {got}")

    def to_text(self) -> str:
        return _PREFIX + base64.b64encode(self.raw).decode()

    @classmethod
    def from_text(cls, text: str) -> SealPublicKey:
        """Parse ``x25519:<base64>``. Raises KeyMaterialError if malformed."""
        if not isinstance(text, str) or not text.startswith(_PREFIX):
            raise KeyMaterialError("seal public key must look like 'x25519:<base64>'")
        try:
            raw = base64.b64decode(text[len(_PREFIX) :], validate=True)
        except binascii.Error as e:
            raise KeyMaterialError("seal public key is not valid base64") from e
        if len(raw) != 32:
            raise KeyMaterialError(f"seal public key must decode to 32 bytes, got {len(raw)}")
        return cls(raw)


class SealKeyPair:
    """An X25519 key pair that sealed payloads are opened with.

    The private key is never serialized implicitly: :meth:`unsafe_private_bytes` only.
    """

    __slots__ = ("_key",)

    def __init__(self, key: X25519PrivateKey) -> None:
        if not isinstance(key, X25519PrivateKey):
            raise TypeError(f"expected X25519PrivateKey, got {type(key).__name__}")
        self._key = key

    @classmethod
    def generate(cls) -> SealKeyPair:
        return cls(X25519PrivateKey.generate())

    @classmethod
    def from_private_bytes(cls, raw: bytes) -> SealKeyPair:
        if not isinstance(raw, bytes) or len(raw) != 32:
            raise KeyMaterialError("X25519 private key must be 32 bytes")
        return cls(X25519PrivateKey.from_private_bytes(raw))

    def unsafe_private_bytes(self) -> bytes:
        """The 32 raw private bytes. Only for writing to a 0600 key file."""
        return self._key.private_bytes(
            serialization.Encoding.Raw,
            serialization.PrivateFormat.Raw,
            serialization.NoEncryption(),
        )

    def public_key(self) -> SealPublicKey:
        return SealPublicKey(
            self._key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        )

    def public_text(self) -> str:
        """``x25519:<base64>`` of the public key."""
        return self.public_key().to_text()

    def __repr__(self) -> str:
        return f"SealKeyPair(public={self.public_text()!r})"


def job_info(job_id: str, direction: Literal["input", "result"]) -> bytes:
    """The ``info`` for a job payload: binds the job id and which way it travels."""
    if not isinstance(job_id, str) or not job_id:
        raise ValueError(f"job_id must be a non-empty str, got {job_id!r}")
    if direction not in ("input", "result"):
        raise ValueError(f"direction must be 'input' or 'result', got {direction!r}")
    jid = job_id.encode()
    return b"som/job/v1\x00" + len(jid).to_bytes(4, "big") + jid + b"\x00" + direction.encode()


def _hpke_info(header: bytes, info: bytes, aad: bytes) -> bytes:
    digest = hashlib.sha256(len(info).to_bytes(4, "big") + info + aad).digest()
    return _DOMAIN + header + digest


def _check(info: object, aad: object) -> None:
    if not isinstance(info, bytes):
        raise TypeError(f"info must be bytes, got {type(info).__name__}")
    if not info:
        raise ValueError("info must bind the context (e.g. job_info(job_id, direction)), got b''")
    if not isinstance(aad, bytes):
        raise TypeError(f"aad must be bytes, got {type(aad).__name__}")


def seal(recipient_public: SealPublicKey | str, plaintext: bytes, *, info: bytes, aad: bytes = b"") -> bytes:
    """Encrypt ``plaintext`` so that only the holder of ``recipient_public``'s key can open it.

    ``info`` and ``aad`` must be given again, identical, to :func:`open_sealed`.
    Raises TypeError/ValueError on bad input, KeyMaterialError on a malformed key text.
    """
    if isinstance(recipient_public, str):
        recipient_public = SealPublicKey.from_text(recipient_public)
    if not isinstance(recipient_public, SealPublicKey):
        raise TypeError(f"recipient_public must be SealPublicKey or str, got {type(recipient_public).__name__}")
    if not isinstance(plaintext, bytes):
        raise TypeError(f"plaintext must be bytes, got {type(plaintext).__name__}")
    _check(info, aad)
    pub = X25519PublicKey.from_public_bytes(recipient_public.raw)
    body = _SUITE.encrypt(plaintext, pub, info=_hpke_info(_HEADER, info, aad))
    return _HEADER + body


def open_sealed(
    keypair: SealKeyPair,
    blob: bytes,
    *,
    info: bytes,
    aad: bytes = b"",
    max_size: int = DEFAULT_MAX_SIZE,
) -> bytes:
    """Open a payload made by :func:`seal` for ``keypair``'s public key.

    Raises ValueError if ``blob`` is larger than ``max_size``, too short, or not version-1
    framing (checked before any cryptography); DecryptionError (opaque) if it was altered,
    sealed to another key, or ``info``/``aad`` differ.
    """
    if not isinstance(keypair, SealKeyPair):
        raise TypeError(f"keypair must be a SealKeyPair, got {type(keypair).__name__}")
    if not isinstance(blob, bytes):
        raise TypeError(f"blob must be bytes, got {type(blob).__name__}")
    _check(info, aad)
    if len(blob) > max_size:
        raise ValueError(f"sealed payload too large: max {max_size} bytes, got {len(blob)}")
    min_len = len(_HEADER) + _ENC_LEN + _TAG_LEN
    if len(blob) < min_len:
        raise ValueError(f"sealed payload too short: need at least {min_len} bytes, got {len(blob)}")
    if not blob.startswith(_MAGIC):
        raise ValueError(f"not a sealed payload: expected prefix {_MAGIC!r}, got {blob[: len(_MAGIC)]!r}")
    version, suite = blob[len(_MAGIC)], blob[len(_MAGIC) + 1]
    if version != _VERSION or suite != _SUITE_X25519_SHA256_CHACHA:
        raise ValueError(
            f"unsupported sealed payload: expected version {_VERSION} suite "
            f"{_SUITE_X25519_SHA256_CHACHA}, got version {version} suite {suite}"
        )
    header = blob[: len(_HEADER)]
    try:
        return _SUITE.decrypt(blob[len(_HEADER) :], keypair._key, info=_hpke_info(header, info, aad))
    except (InvalidTag, ValueError) as e:
        raise DecryptionError("sealed payload did not open") from e
