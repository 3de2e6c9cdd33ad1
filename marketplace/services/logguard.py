"""The log's memory of what it signed, kept where a database restore cannot roll it back.

For: the last signed checkpoint of each log origin, written atomically (fsync'd) beside the log
key in the key directory (``<key_dir>/log-<origin digest>.checkpoint``) after every signature and
before the signature is stored or served. :func:`marketplace.services.ledger.sign_checkpoint`
refuses to sign, and a server refuses to start, when the tree in the database is behind that
checkpoint or does not contain it (a restored backup, a rolled-back or forked database): a log
that signed size ``n`` with one root must never sign size ``n`` (or any later size) over another
history. Certificate Transparency logs hold the same rule.
Not for: deciding what is consistent (the ledger module checks roots and proofs), or replacing a
witness: the file guards this operator's own key directory; a witness (``crypto.witness``) guards
against an operator who rewrites it too.

What to do when refused (the message says it): restore a later backup of the database, one taken
after the kept checkpoint was signed; or, knowingly, start a new log origin (``SOM_LOG_ORIGIN`` set
to a new name, which verifiers then pin): the old origin's kept checkpoint stays, so the old log
is never signed again by mistake.
"""

from __future__ import annotations

import hashlib
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from crypto.checkpoint import Checkpoint, open_checkpoint
from crypto.errors import CryptoError
from crypto.note import NoteVerifier

__all__ = ["KeptCheckpoint", "kept_path", "read_kept", "refusal", "write_kept"]


@dataclass(frozen=True)
class KeptCheckpoint:
    size: int
    root_hash: bytes
    note: bytes
    path: Path


def kept_path(key_dir: Path, origin: str) -> Path:
    """``<key_dir>/log-<first 16 hex of sha256(origin)>.checkpoint``."""
    return Path(key_dir) / f"log-{hashlib.sha256(origin.encode()).hexdigest()[:16]}.checkpoint"


def read_kept(key_dir: Path, origin: str, verifier: NoteVerifier) -> KeptCheckpoint | None:
    """The kept checkpoint of ``origin`` (its signature checked with ``verifier``), or None.

    Raises ValueError if the file is there but is not a checkpoint of this log signed by its key
    (the file is damaged or from another log: the log cannot tell what it signed, so it refuses).
    """
    path = kept_path(key_dir, origin)
    try:
        note = path.read_bytes()
    except FileNotFoundError:
        return None
    try:
        cp = open_checkpoint(note, verifier, origin=origin)
    except CryptoError as e:
        raise ValueError(
            f"{path} is not a checkpoint of log {origin!r} signed by this log's key ({e}); the log "
            "cannot tell what it last signed: put back the file from the key directory's backup, or "
            "start a new log origin (SOM_LOG_ORIGIN)"
        ) from e
    return KeptCheckpoint(cp.size, cp.root_hash, note, path)


def write_kept(key_dir: Path, origin: str, note: bytes, cp: Checkpoint) -> None:
    """Replace the kept checkpoint by ``note`` (of ``cp``), atomically and durably (0600)."""
    path = kept_path(key_dir, origin)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(note)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    dfd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dfd)  # the rename itself survives a power cut
    finally:
        os.close(dfd)


def refusal(kept: KeptCheckpoint, size: int, *, behind: bool) -> str:
    """The message of a refusal to sign (or to start) over a database that lost signed history."""
    what = (
        f"the ledger in the database has {size} leaves, fewer than the {kept.size} of the last "
        "checkpoint this log signed"
        if behind
        else f"the ledger in the database (size {size}) does not contain the tree of the last checkpoint "
        f"this log signed (size {kept.size}): its history differs"
    )
    return (
        f"{what} (kept in {kept.path}). The database was restored from an older backup or rolled "
        "back; signing now would fork the log (two different trees at one size), so the log refuses. "
        f"Restore a later backup of the database, one taken after size {kept.size} was signed; or "
        "start a new log origin on purpose: set SOM_LOG_ORIGIN to a new name (for example "
        "'<origin>/2') and have verifiers pin it (docs/deployment.md, 'Backup and restore')."
    )
