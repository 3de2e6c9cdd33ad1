"""tlog checkpoints (c2sp.org/tlog-checkpoint): the signed statement of a log's size and root.

For: formatting, strictly parsing, signing and opening checkpoints of the ledger's Merkle tree.
Not for: proving anything about the tree (see :mod:`crypto.merkle`) or cosigning (see
:mod:`crypto.note` and :mod:`crypto.witness`).

A checkpoint body is ``origin\\n<size in decimal>\\n<base64 root hash>\\n`` followed by zero or
more non-empty extension lines; it is the text of a C2SP signed note.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass

from crypto.note import MalformedNote, NoteSigner, NoteVerifier, open_note, sign_note

__all__ = ["Checkpoint", "open_checkpoint", "sign_checkpoint"]

_HASH_SIZE = 32


def _check_line(what: str, value: object) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{what} must be str, got {type(value).__name__}")
    if not value:
        raise ValueError(f"{what} must be non-empty")
    if any(ord(c) < 0x20 for c in value):
        raise ValueError(f"{what} must not contain newlines or control characters")
    return value


@dataclass(frozen=True)
class Checkpoint:
    """A log's origin, tree size and root hash (plus optional extension lines)."""

    origin: str
    size: int
    root_hash: bytes
    extensions: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        _check_line("origin", self.origin)
        if type(self.size) is not int:
            raise TypeError(f"size must be int, got {type(self.size).__name__}")
        if self.size < 0:
            raise ValueError(f"size must be >= 0, got {self.size}")
        if not isinstance(self.root_hash, bytes) or len(self.root_hash) != _HASH_SIZE:
            raise ValueError(f"root_hash must be {_HASH_SIZE} bytes")
        if not isinstance(self.extensions, tuple):
            raise TypeError("extensions must be a tuple of str")
        for ext in self.extensions:
            _check_line("extension line", ext)

    def body(self) -> bytes:
        """The note text (c2sp.org/tlog-checkpoint "Note text")."""
        lines = [self.origin, str(self.size), base64.b64encode(self.root_hash).decode()]
        return ("\n".join([*lines, *self.extensions]) + "\n").encode()

    @classmethod
    def parse(cls, body: bytes | str) -> Checkpoint:
        """Strictly parse a checkpoint body; :class:`MalformedNote` (an ``InvalidSignature``)
        if it is not one."""
        try:
            text = body.decode() if isinstance(body, bytes) else body
        except UnicodeDecodeError as e:
            raise MalformedNote("checkpoint is not UTF-8") from e
        if not isinstance(text, str):
            raise TypeError(f"body must be bytes or str, got {type(body).__name__}")
        if not text.endswith("\n"):
            raise MalformedNote("checkpoint must end in a newline")
        lines = text[:-1].split("\n")
        if len(lines) < 3:
            raise MalformedNote("checkpoint needs origin, size and root hash lines")
        origin, size_s, root_s, *ext = lines
        # Decimal, no sign, no leading zeros (except "0" itself).
        if not size_s.isascii() or not size_s.isdigit() or (size_s != "0" and size_s[0] == "0"):
            raise MalformedNote("checkpoint size must be a decimal without leading zeros")
        try:
            root = base64.b64decode(root_s, validate=True)
        except binascii.Error as e:
            raise MalformedNote("checkpoint root hash is not base64") from e
        if base64.b64encode(root).decode() != root_s:
            raise MalformedNote("checkpoint root hash is not canonical base64")
        try:
            return cls(origin, int(size_s), root, tuple(ext))
        except ValueError as e:
            raise MalformedNote(f"checkpoint is malformed: {e}") from e


def sign_checkpoint(cp: Checkpoint, signer: NoteSigner) -> bytes:
    """The checkpoint as a signed note. By convention the signer's name is the origin."""
    return sign_note(cp.body().decode(), [signer])


def open_checkpoint(note: bytes, log_verifier: NoteVerifier, *, origin: str | None = None) -> Checkpoint:
    """Verify the log's signature on a checkpoint note and parse it.

    Raises :class:`crypto.errors.InvalidSignature` (or its subclass ``MalformedNote``) if the
    note is not signed by ``log_verifier`` or is not a checkpoint, or if ``origin`` is given
    and differs.
    """
    opened = open_note(note, [log_verifier])
    cp = Checkpoint.parse(opened.text)
    if origin is not None and cp.origin != origin:
        raise MalformedNote(f"checkpoint origin is {cp.origin!r}, expected {origin!r}")
    return cp
