"""C2SP signed notes (Ed25519, type 0x01) and tlog cosignatures (timestamped Ed25519, type 0x04).

For: signing and opening the text envelopes that carry ledger checkpoints, and the witness
cosignatures on them, in the format of c2sp.org/signed-note, c2sp.org/tlog-cosignature and Go's
golang.org/x/mod/sumdb/note (so notes interoperate with sum.golang.org-style tooling).

Not for: what the text means (see :mod:`crypto.checkpoint`), other signature types (ECDSA,
ML-DSA, RFC 6962 tree head signatures), or key storage.

A note is ``text`` (ending in a newline), a blank line, then one or more signature lines
``"— <key name> base64(4-byte key id || signature)\\n"``. Opening a note verifies every signature
from a known key (name and key id both match), ignores the others, and raises
:class:`crypto.errors.InvalidSignature` if a known key's signature fails or no known key signed.
A structurally malformed note raises :class:`MalformedNote` (a subclass of ``InvalidSignature``).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import ClassVar, Protocol, Self

from crypto.errors import InvalidSignature, KeyMaterialError
from crypto.signing import SigningKey, VerifyKey

__all__ = [
    "ALG_COSIGNATURE_V1",
    "ALG_ED25519",
    "MAX_SIGNATURES",
    "CosignatureSigner",
    "CosignatureVerifier",
    "MalformedNote",
    "Note",
    "NoteSignature",
    "NoteSigner",
    "NoteVerifier",
    "Verifier",
    "add_signature_lines",
    "cosign",
    "cosignature_timestamp",
    "format_vkey",
    "key_id",
    "open_note",
    "sign_note",
    "verify_cosignature",
]

# c2sp.org/signed-note "Signature types"
ALG_ED25519 = 0x01
ALG_COSIGNATURE_V1 = 0x04
# Go sumdb/note refuses notes with more than 100 signatures; C2SP requires accepting >= 16.
MAX_SIGNATURES = 100
_SIG_PREFIX = "\u2014 "  # em dash, space
_COSIG_HEADER = b"cosignature/v1\n"
_MAX_TIMESTAMP = 2**63 - 1


class MalformedNote(InvalidSignature):
    """The bytes are not a well-formed signed note (the message says what is wrong)."""


def _check_name(name: object) -> str:
    # c2sp.org/signed-note: key names are non-empty, without Unicode spaces or '+'.
    if not isinstance(name, str):
        raise TypeError(f"key name must be str, got {type(name).__name__}")
    if not name or "+" in name or any(c.isspace() for c in name):
        raise ValueError(f"key name must be non-empty, without spaces or '+', got {name!r}")
    if any(ord(c) < 0x20 for c in name):
        raise ValueError("key name must not contain control characters")
    return name


def key_id(name: str, alg: int, public_key: bytes) -> bytes:
    """``SHA-256(name || 0x0A || alg || public key)[:4]`` (c2sp.org/signed-note)."""
    _check_name(name)
    return hashlib.sha256(name.encode() + b"\n" + bytes([alg]) + public_key).digest()[:4]


def format_vkey(name: str, verify_key: VerifyKey, *, alg: int = ALG_ED25519) -> str:
    """The verifier key text ``name+hex(key id)+base64(alg || public key)``."""
    if alg not in (ALG_ED25519, ALG_COSIGNATURE_V1):
        raise ValueError(f"alg must be 0x01 or 0x04, got {alg:#04x}")
    kid = key_id(name, alg, verify_key.raw)
    return f"{name}+{kid.hex()}+{base64.b64encode(bytes([alg]) + verify_key.raw).decode()}"


def _parse_vkey(text: object, want_alg: int) -> tuple[str, VerifyKey]:
    if not isinstance(text, str):
        raise TypeError(f"vkey must be str, got {type(text).__name__}")
    parts = text.strip().split("+", 2)
    if len(parts) != 3:
        raise KeyMaterialError("vkey must look like 'name+keyid+base64key'")
    name, kid_hex, b64 = parts
    try:
        _check_name(name)
        kid = bytes.fromhex(kid_hex)
        raw = base64.b64decode(b64, validate=True)
    except (ValueError, binascii.Error) as e:
        raise KeyMaterialError("vkey is malformed") from e
    if len(kid_hex) != 8 or len(raw) != 33:
        raise KeyMaterialError("vkey must carry an 8-hex-digit key id and a 32-byte Ed25519 key")
    if raw[0] != want_alg:
        raise KeyMaterialError(f"vkey has signature type {raw[0]:#04x}, expected {want_alg:#04x}")
    if key_id(name, raw[0], raw[1:]) != kid:
        raise KeyMaterialError("vkey key id does not match its name and key")
    return name, VerifyKey(raw[1:])


def _as_unix(now: int | datetime | None) -> int:
    if now is None:
        return int(time.time())
    if isinstance(now, datetime):
        if now.tzinfo is None:
            raise ValueError("now must be timezone-aware")
        return int(now.timestamp())
    if type(now) is not int:
        raise TypeError(f"now must be int seconds or datetime, got {type(now).__name__}")
    return now


class Verifier(Protocol):
    """Anything :func:`open_note` can check signatures with."""

    @property
    def name(self) -> str: ...

    @property
    def key_id(self) -> bytes: ...

    def verify(self, text: bytes, signature: bytes) -> None: ...


@dataclass(frozen=True)
class _NamedVerifier:
    """A named Ed25519 public key of one signature type (``alg``): key id and vkey text."""

    alg: ClassVar[int]
    name: str
    key: VerifyKey

    def __post_init__(self) -> None:
        _check_name(self.name)

    @classmethod
    def from_vkey(cls, text: str) -> Self:
        name, key = _parse_vkey(text, cls.alg)
        return cls(name, key)

    @property
    def key_id(self) -> bytes:
        return key_id(self.name, self.alg, self.key.raw)

    def vkey(self) -> str:
        return format_vkey(self.name, self.key, alg=self.alg)


@dataclass(frozen=True)
class NoteVerifier(_NamedVerifier):
    """An Ed25519 note verifier (type 0x01)."""

    alg: ClassVar[int] = ALG_ED25519

    def verify(self, text: bytes, signature: bytes) -> None:
        # c2sp.org/signed-note "Ed25519 signatures": RFC 8032 over the note text.
        self.key.verify(signature, text)


class NoteSigner:
    """Signs notes with an Ed25519 key under a key name (type 0x01)."""

    __slots__ = ("_key", "name")

    def __init__(self, name: str, key: SigningKey) -> None:
        self.name = _check_name(name)
        if not isinstance(key, SigningKey):
            raise TypeError(f"key must be a SigningKey, got {type(key).__name__}")
        self._key = key

    @classmethod
    def from_skey(cls, text: str) -> NoteSigner:
        """Parse Go's ``PRIVATE+KEY+name+hex(key id)+base64(0x01 || seed)`` text."""
        parts = text.strip().split("+", 4)
        if len(parts) != 5 or parts[:2] != ["PRIVATE", "KEY"]:
            raise KeyMaterialError("skey must look like 'PRIVATE+KEY+name+keyid+base64key'")
        try:
            raw = base64.b64decode(parts[4], validate=True)
        except binascii.Error as e:
            raise KeyMaterialError("skey is not valid base64") from e
        if len(raw) != 33 or raw[0] != ALG_ED25519:
            raise KeyMaterialError("skey must hold 0x01 and a 32-byte Ed25519 seed")
        signer = cls(parts[2], SigningKey.from_private_bytes(raw[1:]))
        if signer.key_id.hex() != parts[3]:
            raise KeyMaterialError("skey key id does not match its name and key")
        return signer

    @property
    def key_id(self) -> bytes:
        return key_id(self.name, ALG_ED25519, self._key.verify_key.raw)

    @property
    def verifier(self) -> NoteVerifier:
        return NoteVerifier(self.name, self._key.verify_key)

    def sign(self, text: bytes) -> bytes:
        return self._key.sign(text)

    def __repr__(self) -> str:
        return f"NoteSigner({self.name!r}, key_id={self.key_id.hex()})"


@dataclass(frozen=True)
class NoteSignature:
    """One signature line: key name, 4-byte key id and the signature bytes after the id."""

    name: str
    key_id: bytes
    signature: bytes

    def line(self) -> str:
        b64 = base64.b64encode(self.key_id + self.signature).decode()
        return f"{_SIG_PREFIX}{self.name} {b64}\n"


@dataclass(frozen=True)
class Note:
    """An opened note: its text, the signatures that verified, and those from unknown keys."""

    text: str
    signatures: tuple[NoteSignature, ...]
    unverified: tuple[NoteSignature, ...] = ()


def _check_text(text: str) -> None:
    if not text.endswith("\n"):
        raise MalformedNote("note text must end in a newline")
    # c2sp.org/signed-note: no ASCII control characters other than newline.
    if any(ord(c) < 0x20 and c != "\n" for c in text):
        raise MalformedNote("note must not contain control characters other than newline")


def sign_note(text: str, signers: NoteSigner | Sequence[NoteSigner]) -> bytes:
    """Sign ``text`` (ending in a newline) with one or more signers; return the note bytes."""
    if not isinstance(text, str):
        raise TypeError(f"text must be str, got {type(text).__name__}")
    signer_list = [signers] if isinstance(signers, NoteSigner) else list(signers)
    if not signer_list:
        raise ValueError("sign_note needs at least one signer")
    try:
        _check_text(text)
    except MalformedNote as e:
        raise ValueError(str(e)) from None
    body = text.encode()
    lines = [NoteSignature(s.name, s.key_id, s.sign(body)).line() for s in signer_list]
    return body + b"\n" + "".join(lines).encode()


def _parse(data: bytes) -> tuple[str, list[tuple[NoteSignature, str]]]:
    try:
        msg = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise MalformedNote("note is not valid UTF-8") from e
    if any(ord(c) < 0x20 and c != "\n" for c in msg):
        raise MalformedNote("note must not contain control characters other than newline")
    # The text is separated from the signatures by the last blank line.
    split = msg.rfind("\n\n")
    if split < 0:
        raise MalformedNote("note has no blank line before its signatures")
    text, block = msg[: split + 1], msg[split + 2 :]
    if not block or not block.endswith("\n"):
        raise MalformedNote("note signature block must be non-empty and end in a newline")
    sigs: list[tuple[NoteSignature, str]] = []
    for line in block[:-1].split("\n"):
        if len(sigs) >= MAX_SIGNATURES:
            raise MalformedNote(f"note has more than {MAX_SIGNATURES} signatures")
        if not line.startswith(_SIG_PREFIX):
            raise MalformedNote("signature lines must start with an em dash and a space")
        name, sep, b64 = line[len(_SIG_PREFIX) :].partition(" ")
        try:
            _check_name(name)
            raw = base64.b64decode(b64, validate=True)
        except (ValueError, binascii.Error) as e:
            raise MalformedNote("signature line is malformed") from e
        if not sep or len(raw) < 5:
            raise MalformedNote("signature line is malformed")
        sigs.append((NoteSignature(name, raw[:4], raw[4:]), line))
    return text, sigs


def open_note(data: bytes, verifiers: Verifier | Iterable[Verifier]) -> Note:
    """Parse a signed note and verify it against the known ``verifiers``.

    Returns the :class:`Note` with the verified signatures (duplicates dropped) and the
    signatures from unknown keys. Raises :class:`MalformedNote` for structure,
    :class:`InvalidSignature` if a known key's signature fails or no known key signed.
    """
    if not isinstance(data, (bytes, bytearray)):
        raise TypeError(f"note must be bytes, got {type(data).__name__}")
    vs: list[Verifier] = list(verifiers) if isinstance(verifiers, Iterable) else [verifiers]
    known: dict[tuple[str, bytes], Verifier] = {(v.name, v.key_id): v for v in vs}
    text, sigs = _parse(bytes(data))
    body = text.encode()
    verified: list[NoteSignature] = []
    unverified: list[NoteSignature] = []
    seen: set[tuple[str, bytes]] = set()
    seen_lines: set[str] = set()
    for sig, line in sigs:
        v = known.get((sig.name, sig.key_id))
        if v is None:
            # c2sp.org/signed-note: verifiers MUST ignore signatures from unknown keys.
            if line not in seen_lines:
                seen_lines.add(line)
                unverified.append(sig)
            continue
        if (sig.name, sig.key_id) in seen:
            continue
        seen.add((sig.name, sig.key_id))
        v.verify(body, sig.signature)  # a known key that fails rejects the whole note
        verified.append(sig)
    if not verified:
        raise InvalidSignature("note is not signed by any known key")
    return Note(text, tuple(verified), tuple(unverified))


def add_signature_lines(note: bytes, lines: str | Iterable[str]) -> bytes:
    """Append signature lines (e.g. cosignatures from a witness) to a signed note."""
    _parse(note)
    extra = [lines] if isinstance(lines, str) else list(lines)
    for line in extra:
        if not line.startswith(_SIG_PREFIX) or not line.endswith("\n") or line.count("\n") != 1:
            raise ValueError("each line must be one '— name signature' line ending in a newline")
    out = note + "".join(extra).encode()
    _parse(out)
    return out


# ---------------------------------------------------------------------------- cosignatures


def _cosigned_message(timestamp: int, body: bytes) -> bytes:
    # c2sp.org/tlog-cosignature "Ed25519 signed message".
    return _COSIG_HEADER + b"time %d\n" % timestamp + body


@dataclass(frozen=True)
class CosignatureVerifier(_NamedVerifier):
    """Verifies tlog-cosignature/v1 timestamped Ed25519 cosignatures (type 0x04)."""

    alg: ClassVar[int] = ALG_COSIGNATURE_V1

    def verify(self, text: bytes, signature: bytes) -> None:
        if len(signature) != 8 + 64:
            raise InvalidSignature("cosignature did not verify")
        ts = int.from_bytes(signature[:8], "big")
        if ts > _MAX_TIMESTAMP:
            raise InvalidSignature("cosignature did not verify")
        self.key.verify(signature[8:], _cosigned_message(ts, text))


class CosignatureSigner:
    """A witness's cosigning key under a name (type 0x04)."""

    __slots__ = ("_key", "name")

    def __init__(self, name: str, key: SigningKey) -> None:
        self.name = _check_name(name)
        if not isinstance(key, SigningKey):
            raise TypeError(f"key must be a SigningKey, got {type(key).__name__}")
        self._key = key

    @property
    def key_id(self) -> bytes:
        return key_id(self.name, ALG_COSIGNATURE_V1, self._key.verify_key.raw)

    @property
    def verifier(self) -> CosignatureVerifier:
        return CosignatureVerifier(self.name, self._key.verify_key)

    def sign(self, body: bytes, timestamp: int) -> bytes:
        """``timestamp (8 bytes, big-endian) || Ed25519 signature``."""
        if not 0 <= timestamp <= _MAX_TIMESTAMP:
            raise ValueError(f"timestamp must be in [0, 2**63 - 1], got {timestamp}")
        sig = self._key.sign(_cosigned_message(timestamp, body))
        return timestamp.to_bytes(8, "big") + sig

    def __repr__(self) -> str:
        return f"CosignatureSigner({self.name!r}, key_id={self.key_id.hex()})"


def cosign(checkpoint_body: bytes, signer: CosignatureSigner, *, now: int | datetime | None = None) -> str:
    """Return the cosignature line ``"— <name> base64(key id || timestamp || sig)\\n"``.

    ``checkpoint_body`` is the checkpoint note text (ending in a newline, no signatures).
    """
    if not isinstance(checkpoint_body, bytes):
        raise TypeError(f"checkpoint_body must be bytes, got {type(checkpoint_body).__name__}")
    try:
        _check_text(checkpoint_body.decode())
    except (UnicodeDecodeError, MalformedNote) as e:
        raise ValueError(f"checkpoint_body is not a note text: {e}") from None
    sig = signer.sign(checkpoint_body, _as_unix(now))
    return NoteSignature(signer.name, signer.key_id, sig).line()


def verify_cosignature(
    checkpoint_body: bytes,
    line: str,
    verifier: CosignatureVerifier,
    *,
    now: int | datetime | None = None,
) -> None:
    """``None`` if ``line`` is ``verifier``'s valid cosignature on ``checkpoint_body``.

    Raises :class:`InvalidSignature` for a wrong key, bad signature, or a timestamp after ``now``
    (when ``now`` is given).
    """
    note = checkpoint_body + b"\n" + line.encode()
    opened = open_note(note, [verifier])
    ts = int.from_bytes(opened.signatures[0].signature[:8], "big")
    if now is not None and ts > _as_unix(now):
        raise InvalidSignature("cosignature did not verify")


def cosignature_timestamp(sig: NoteSignature) -> int:
    """The POSIX timestamp inside a (verified) cosignature."""
    if len(sig.signature) != 72:
        raise ValueError("not a tlog-cosignature/v1 Ed25519 signature")
    return int.from_bytes(sig.signature[:8], "big")
