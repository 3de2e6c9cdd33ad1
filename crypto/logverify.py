"""Offline verification of a ledger export: the compliance officer's check that nothing was
dropped, changed, reordered or rewritten.

For: ``som ledger verify``. Given every leaf (index, exact bytes that were hashed), the signed
checkpoints and the log's vkey *that the verifier trusts* (obtained out of band, or pinned on
first use: never the one shipped with the data), recompute each leaf hash and the tree root at every checkpoint
size in one incremental pass (RFC 9162 §2.1.1 via :class:`crypto.merkle.CompactRange`), check
each checkpoint's signature (C2SP signed note) and root, and check that a checkpoint the officer
kept from earlier (``trusted_checkpoint``) describes the same history.

Not for: deciding what a leaf *means* (pass ``leaf_check`` for contract totals and the like),
fetching anything over the network, or verifying single receipts (see :mod:`crypto.merkle`).

Export layout: ``DIR/leaves.jsonl`` (one ``{"index": i, "leaf": "<base64>"}`` per line),
``DIR/checkpoints/*.note`` (signed checkpoint notes), ``DIR/log.vkey`` (the log's vkey text).
Other files may sit beside them and are ignored. ``DIR/log.vkey`` is only *compared* against the
trusted key (as Go's sumdb and Sigstore clients pin their trust root): an export re-signed under
another key, with its own ``log.vkey``, is refused with :class:`UntrustedLogKey`.

Every failure raises :class:`LogVerificationError` naming the first bad leaf index or
checkpoint file; :class:`UntrustedLogKey` (a subclass) when the export's key or origin is not
the trusted one.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from crypto.checkpoint import Checkpoint, open_checkpoint
from crypto.errors import CryptoError, InvalidProof, InvalidSignature, KeyMaterialError
from crypto.merkle import EMPTY_ROOT, CompactRange, verify_consistency
from crypto.note import NoteVerifier

__all__ = [
    "LogSummary",
    "LogVerificationError",
    "UntrustedLogKey",
    "read_export_leaves",
    "verify_export_dir",
    "verify_log",
    "verify_trusted_vkey",
    "vkey_fingerprint",
]

LeafCheck = Callable[[int, bytes], None]


class LogVerificationError(CryptoError):
    """The export does not verify; the message names the first bad leaf or checkpoint."""


class UntrustedLogKey(LogVerificationError):
    """The export's log key or origin is not the one the verifier trusts (expected vs got)."""


def vkey_fingerprint(vkey: str) -> str:
    """The fingerprint people compare out of band: SHA-256 of the vkey's key bytes (the decoded
    base64 part: signature type byte and public key), first 16 hex digits in groups of 4.

    Shell equivalent: ``cut -d+ -f3- log.vkey | base64 -d | sha256sum | cut -c1-16``.
    Raises ``ValueError`` if ``vkey`` is not a C2SP note verifier key.
    """
    try:
        verifier = NoteVerifier.from_vkey(vkey)
    except (KeyMaterialError, TypeError) as e:
        raise ValueError(f"not a C2SP note verifier key (name+keyid+base64): {e}") from e
    digest = hashlib.sha256(bytes([verifier.alg]) + verifier.key.raw).hexdigest()[:16]
    return " ".join(digest[i : i + 4] for i in range(0, 16, 4))


def _describe(verifier: NoteVerifier) -> str:
    return f"{verifier.name} (fingerprint {vkey_fingerprint(verifier.vkey())})"


def _trusted(trusted_vkey: str) -> NoteVerifier:
    if not isinstance(trusted_vkey, str) or not trusted_vkey.strip():
        raise ValueError("trusted_vkey: the log's vkey obtained out of band is required")
    try:
        return NoteVerifier.from_vkey(trusted_vkey)
    except (KeyMaterialError, TypeError) as e:
        raise ValueError(f"trusted_vkey is not a C2SP note verifier key: {e}") from e


def verify_trusted_vkey(exported_vkey: str, trusted_vkey: str) -> None:
    """Check that the vkey shipped with an export is the trusted one; raise
    :class:`UntrustedLogKey` naming expected vs got (name and fingerprint) if not, or
    :class:`LogVerificationError` if the shipped one does not parse. ``ValueError`` if
    ``trusted_vkey`` itself is not a vkey. The shipped key is never used to verify anything."""
    trusted = _trusted(trusted_vkey)
    try:
        got = NoteVerifier.from_vkey(exported_vkey)
    except (KeyMaterialError, TypeError) as e:
        raise LogVerificationError(f"log.vkey in the export is not valid: {e}") from e
    if (got.name, got.key.raw) != (trusted.name, trusted.key.raw):
        raise UntrustedLogKey(
            f"the export's log key is not the trusted one: expected {_describe(trusted)}, got {_describe(got)}"
        )


@dataclass(frozen=True)
class LogSummary:
    """What a verified export contains."""

    origin: str
    leaves: int
    checkpoints: int
    latest_size: int
    latest_root: bytes
    trusted_size: int | None = None

    def __str__(self) -> str:
        root = base64.b64encode(self.latest_root).decode()
        trusted = "" if self.trusted_size is None else f", trusted checkpoint {self.trusted_size}"
        return (
            f"{self.origin}: {self.leaves} leaves, {self.checkpoints} checkpoints verified; "
            f"latest size {self.latest_size} root {root}{trusted}"
        )


def _b64(h: bytes) -> str:
    return base64.b64encode(h).decode()


def verify_log(
    leaves: Iterable[tuple[int, bytes]],
    checkpoints: Sequence[bytes] | Mapping[str, bytes],
    trusted_vkey: str,
    *,
    origin: str | None = None,
    trusted_checkpoint: bytes | None = None,
    trusted_proof: Sequence[bytes] | None = None,
    leaf_check: LeafCheck | None = None,
) -> LogSummary:
    """Verify a log export; return its summary or raise :class:`LogVerificationError`.

    ``leaves`` yields ``(index, leaf bytes)`` in order, indexes contiguous from 0.
    ``checkpoints`` are signed notes, by name (e.g. file name) or in a list.
    ``trusted_vkey`` is the log's vkey the verifier trusts (out of band or pinned; required):
    every checkpoint must be signed by it. ``origin`` is the log's origin the verifier expects
    (default: the trusted key's name, as c2sp.org/tlog-checkpoint logs name their key); a
    checkpoint of another origin raises :class:`UntrustedLogKey`. ``ValueError`` if
    ``trusted_vkey`` is not a vkey.
    ``trusted_checkpoint`` is a signed note kept from before: its root must equal the root
    recomputed at its size; if it is newer than the export, ``trusted_proof`` must be an
    RFC 9162 consistency proof from the export's size to it.
    ``leaf_check(index, leaf)`` may raise to reject a leaf (wrapped, naming the index).
    """
    verifier = _trusted(trusted_vkey)
    want_origin = verifier.name if origin is None else origin
    named = (
        list(checkpoints.items())
        if isinstance(checkpoints, Mapping)
        else [(f"checkpoint #{i}", c) for i, c in enumerate(checkpoints)]
    )
    if not named:
        raise LogVerificationError("the export has no checkpoints: nothing is signed")

    # 1. Every checkpoint is signed by the log and names the same log.
    parsed: list[tuple[str, Checkpoint]] = []
    for name, note in named:
        parsed.append((name, _open(name, note, verifier)))
    for name, cp in parsed:
        if cp.origin != want_origin:
            raise UntrustedLogKey(
                f"{name}: origin {cp.origin!r} is not the trusted log's: expected {want_origin!r}, got {cp.origin!r}"
            )
    origin = want_origin
    trusted: Checkpoint | None = None
    if trusted_checkpoint is not None:
        trusted = _open("trusted checkpoint", trusted_checkpoint, verifier)
        if trusted.origin != origin:
            raise LogVerificationError(f"trusted checkpoint is for {trusted.origin!r}, the export for {origin!r}")

    # 2. Checkpoints of one size agree (else the log signed a fork).
    by_size: dict[int, tuple[str, bytes]] = {}
    for name, cp in sorted(parsed, key=lambda p: p[1].size):
        seen = by_size.get(cp.size)
        if seen is not None and seen[1] != cp.root_hash:
            raise LogVerificationError(
                f"{name} and {seen[0]} are signed by the log with different roots for size {cp.size}: the log forked"
            )
        by_size.setdefault(cp.size, (name, cp.root_hash))

    # 3. One pass over the leaves, recording the root at each needed size.
    want = set(by_size)
    if trusted is not None:
        want.add(trusted.size)
    roots: dict[int, bytes] = {}
    last_good = 0

    def check_root(size: int, root: bytes) -> None:
        nonlocal last_good
        roots[size] = root
        entry = by_size.get(size)
        if entry is not None:
            if root != entry[1]:
                raise LogVerificationError(
                    f"{entry[0]} (size {size}): its root {_b64(entry[1])} does not match the "
                    f"exported leaves (recomputed {_b64(root)}); the first changed, missing or "
                    f"reordered leaf is in [{last_good}, {size})"
                )
            last_good = size

    # The compact range (right frontier, largest subtree first) folded inline: this loop runs
    # once per leaf, so no objects per leaf (crypto.merkle.CompactRange does the same, checked
    # against the reference tree; the roots below come from it).
    frontier: list[bytes] = []
    pop, push = frontier.pop, frontier.append
    sha256 = hashlib.sha256
    if 0 in want:
        check_root(0, EMPTY_ROOT)
    expected = 0
    for index, leaf in leaves:
        if index != expected:
            raise LogVerificationError(
                f"leaf {expected}: found index {index} in its place (leaves must be contiguous "
                f"from 0: one is missing, duplicated or out of order)"
            )
        if leaf_check is not None:
            try:
                leaf_check(index, leaf)
            except Exception as e:
                raise LogVerificationError(f"leaf {index}: {e}") from e
        h = sha256(b"\x00" + leaf).digest()  # RFC 9162 §2.1.1 leaf hash
        i = expected
        while i & 1:  # merge the perfect subtrees this leaf completes
            h = sha256(b"\x01" + pop() + h).digest()
            i >>= 1
        push(h)
        expected += 1
        if expected in want:
            check_root(expected, CompactRange(expected, frontier).root())
    n = expected

    # 4. Nothing signed beyond the export.
    for size, (name, _) in sorted(by_size.items()):
        if size > n:
            raise LogVerificationError(
                f"{name} has size {size} but the export has only {n} leaves: leaves [{n}, {size}) are missing"
            )

    # 5. The checkpoint kept from before describes this same history.
    if trusted is not None:
        if trusted.size <= n:
            if roots[trusted.size] != trusted.root_hash:
                raise LogVerificationError(
                    f"trusted checkpoint (size {trusted.size}, root {_b64(trusted.root_hash)}) "
                    f"does not match the exported leaves (recomputed "
                    f"{_b64(roots[trusted.size])}): the history before it was rewritten"
                )
        else:
            if not trusted_proof:
                raise LogVerificationError(
                    f"trusted checkpoint (size {trusted.size}) is newer than the export "
                    f"({n} leaves): export again, or pass a consistency proof from {n}"
                )
            try:
                root_n = CompactRange(n, frontier).root()
                verify_consistency(n, trusted.size, trusted_proof, root_n, trusted.root_hash)
            except InvalidProof as e:
                raise LogVerificationError(
                    f"trusted checkpoint (size {trusted.size}) is not consistent with the "
                    f"export ({n} leaves): the consistency proof did not verify"
                ) from e

    latest_size = max(by_size)
    return LogSummary(
        origin=origin,
        leaves=n,
        checkpoints=len(parsed),
        latest_size=latest_size,
        latest_root=by_size[latest_size][1],
        trusted_size=None if trusted is None else trusted.size,
    )


def _open(name: str, note: bytes, verifier: NoteVerifier) -> Checkpoint:
    try:
        return open_checkpoint(note, verifier)
    except InvalidSignature as e:
        raise LogVerificationError(
            f"{name}: not a checkpoint signed by the trusted log key {verifier.name} "
            f"({verifier.key_id.hex()}, fingerprint {vkey_fingerprint(verifier.vkey())}): {e}"
        ) from e


_PREFIX, _MID, _END = b'{"index":', b',"leaf":"', b'"}\n'


def _exact_line(line: bytes) -> tuple[int, bytes] | None:
    """``(index, leaf)`` of a line in exactly the export's format
    (``{"index":<digits>,"leaf":"<base64>"}``), else None (then the generic JSON path decides).
    Strict base64: anything but the alphabet and final padding is refused."""
    if line[:9] == _PREFIX and line[-3:] == _END:
        k = line.find(_MID, 9)
        if 9 < k <= 27:
            digits = line[9:k]
            if digits.isdigit():
                try:
                    return int(digits), binascii.a2b_base64(line[k + 9 : -3], strict_mode=True)
                except binascii.Error:
                    return None
    return None


def read_export_leaves(path: Path) -> Iterator[tuple[int, bytes]]:
    """Yield ``(index, leaf bytes)`` from a ``leaves.jsonl`` file, line by line."""
    exact = _exact_line
    with path.open("rb", buffering=1 << 20) as f:
        for lineno, line in enumerate(f, 1):
            got = exact(line)
            if got is not None:
                yield got
                continue
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
                index, b64 = obj["index"], obj["leaf"]
                if type(index) is not int or not isinstance(b64, str):
                    raise TypeError("index must be an int and leaf a base64 string")
                leaf = base64.b64decode(b64, validate=True)
            except (ValueError, KeyError, TypeError, binascii.Error) as e:
                raise LogVerificationError(f"{path.name} line {lineno}: not a leaf: {e}") from e
            yield index, leaf


def verify_export_dir(
    path: str | Path,
    *,
    trusted_vkey: str,
    origin: str | None = None,
    trusted_checkpoint: bytes | None = None,
    trusted_proof: Sequence[bytes] | None = None,
    leaf_check: LeafCheck | None = None,
) -> LogSummary:
    """Verify an export directory (layout in the module docstring) against ``trusted_vkey``
    (required: the key obtained out of band or pinned, never ``DIR/log.vkey``, which is only
    compared with it: :func:`verify_trusted_vkey`). See :func:`verify_log`."""
    root = Path(path)
    leaves_path, cp_dir, vkey_path = root / "leaves.jsonl", root / "checkpoints", root / "log.vkey"
    for p in (leaves_path, cp_dir, vkey_path):
        if not p.exists():
            raise LogVerificationError(f"{p} is missing: not a ledger export directory")
    notes = {f"checkpoints/{p.name}": p.read_bytes() for p in sorted(cp_dir.glob("*.note")) if p.is_file()}
    verify_trusted_vkey(vkey_path.read_text(), trusted_vkey)
    return verify_log(
        read_export_leaves(leaves_path),
        notes,
        trusted_vkey,
        origin=origin,
        trusted_checkpoint=trusted_checkpoint,
        trusted_proof=trusted_proof,
        leaf_check=leaf_check,
    )
