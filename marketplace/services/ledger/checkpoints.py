"""The ledger's signed checkpoints: the log key, signing, receipts, the background signer.

For: the log's Ed25519 note key (``<key_dir>/log.key``), signing C2SP checkpoints of the tree
(:mod:`marketplace.services.ledger.tree`), receipts (leaf, inclusion proof, checkpoint) that
verify offline with ``crypto`` only, and the :class:`Checkpointer` thread the runtime owns. Not
for: appends and proofs (:mod:`~marketplace.services.ledger.tree`), HTTP
(``marketplace.api.routes_ledger``).

**The log never signs two inconsistent checkpoints.** Before signing size ``n`` after the last
signed size ``m``: the stored nodes must still give the root signed at ``m``; the leaves in
``[m, n)`` are re-hashed from their bytes and replayed onto the frontier at ``m``, and every
node they complete must equal the stored one; the result must equal the state's frontier; and
a consistency proof built from stored nodes must verify from ``m`` to ``n``. Otherwise
:class:`~marketplace.services.ledger.tree.LedgerIntegrityError` and nothing is signed.
"""

from __future__ import annotations

import base64
import logging
import os
import threading
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import event, insert, select, update
from sqlalchemy.orm import Session, sessionmaker

from crypto.checkpoint import Checkpoint, open_checkpoint
from crypto.checkpoint import sign_checkpoint as _sign_note
from crypto.errors import CryptoError, InvalidProof
from crypto.merkle import CompactRange, root_plan, verify_consistency
from crypto.note import ALG_ED25519, NoteSigner
from crypto.signing import SigningKey
from marketplace.custody import LOG_KEY_FILE
from marketplace.db.base import utcnow
from marketplace.db.models_ledger import NODE_LEVEL_SHIFT
from marketplace.errors import NotFound
from marketplace.services import logguard
from marketplace.services.ledger.tree import (
    _CPS,
    _LEAVES,
    _NODES,
    _STATE,
    UNSIGNED_INFO,
    LedgerIntegrityError,
    _fetch,
    _fold,
    _lock_state,
    _sha256,
    _split,
    consistency_proof,
    inclusion_proof,
    leaf_row,
    root_at,
    tree_size,
)

if TYPE_CHECKING:
    from marketplace.runtime import Runtime

__all__ = [
    "Checkpointer",
    "StoredCheckpoint",
    "checkpoint_at",
    "latest_checkpoint",
    "latest_or_sign",
    "check_kept",
    "check_on_start",
    "load_log_signer",
    "receipt",
    "sign_checkpoint",
    "vkey",
]

log = logging.getLogger("som.ledger")
_VERIFY_BATCH = 20_000


@dataclass(frozen=True)
class StoredCheckpoint:
    """A signed checkpoint as stored: tree size, root hash, the signed note, when."""

    size: int
    root_hash: bytes
    note: bytes
    created_at: datetime


def _to_cp(row: Any) -> StoredCheckpoint:
    return StoredCheckpoint(int(row.size), bytes(row.root_hash), row.note.encode(), row.created_at)


def latest_checkpoint(s: Session) -> StoredCheckpoint | None:
    row = s.execute(select(_CPS).order_by(_CPS.c.size.desc()).limit(1)).one_or_none()
    return None if row is None else _to_cp(row)


def checkpoint_at(s: Session, size: int) -> StoredCheckpoint:
    row = s.execute(select(_CPS).where(_CPS.c.size == size)).one_or_none()
    if row is None:
        raise NotFound(f"no checkpoint of size {size}")
    return _to_cp(row)


# ---------------------------------------------------------------------------- signing


def _skey_text(name: str, key: SigningKey) -> str:
    # Go sumdb/note private key text: PRIVATE+KEY+name+hex(key id)+base64(0x01 || seed).
    signer = NoteSigner(name, key)
    seed = bytes([ALG_ED25519]) + key.unsafe_private_bytes()
    return f"PRIVATE+KEY+{name}+{signer.key_id.hex()}+{base64.b64encode(seed).decode()}\n"


def load_log_signer(path: Path, name: str) -> NoteSigner:
    """The log's Ed25519 note signer from ``path`` (``<key_dir>/log.key``, 0600; created on first
    use, named ``name``: ``settings.log_origin``; the key directory is outside the data
    directory, :mod:`marketplace.custody`). Every replica of one ledger must share this file.
    The runtime loads it once (:attr:`marketplace.runtime.Runtime.log_signer`)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    if not path.exists():
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(_skey_text(name, SigningKey.generate()))
        try:
            os.link(tmp, path)  # atomic; loses to a concurrent creator
            log.info("created the ledger's log key %s", path)
        except FileExistsError:
            pass
        finally:
            tmp.unlink()
    if path.stat().st_mode & 0o077:
        log.warning("ledger key %s is readable by others; chmod 600 it", path)
    return NoteSigner.from_skey(path.read_text())


def _verify_extension(s: Session, last: StoredCheckpoint | None, size: int, state_frontier: list[bytes]) -> bytes:
    """Recompute the root at ``size`` from the signed history; raise LedgerIntegrityError."""
    old = 0 if last is None else last.size
    old_ids = root_plan(old).ids  # smallest subtree first
    old_hashes = _fetch(s, old_ids)
    if last is not None and root_plan(old).rehash(old_hashes)[0] != last.root_hash:
        raise LedgerIntegrityError(f"the stored tree no longer gives the root signed at size {old}: nodes were changed")
    frontier = list(reversed(old_hashes))
    made: list[tuple[int, bytes]] = []
    done = old
    i = old
    while i < size:
        j = min(size, i + _VERIFY_BATCH)
        rows = s.execute(
            select(_LEAVES.c.idx, _LEAVES.c.data, _LEAVES.c.leaf_hash)
            .where(_LEAVES.c.idx >= i, _LEAVES.c.idx < j)
            .order_by(_LEAVES.c.idx)
        ).all()
        hashes: list[bytes] = []
        for idx, data, stored in rows:
            if idx != done + len(hashes):
                raise LedgerIntegrityError(f"leaf {done + len(hashes)} is missing")
            h = _sha256(b"\x00" + bytes(data)).digest()
            if h != bytes(stored):
                raise LedgerIntegrityError(f"leaf {idx}: its bytes do not match its stored hash")
            hashes.append(h)
        done = _fold(done, frontier, hashes, made)
        if done != j:
            raise LedgerIntegrityError(f"leaf {done} is missing")
        if made:
            keys = [k for k, _ in made]
            stored_nodes = {
                int(k): bytes(h) for k, h in s.execute(select(_NODES.c.id, _NODES.c.hash).where(_NODES.c.id.in_(keys)))
            }
            for k, h in made:
                if stored_nodes.get(k) != h:
                    level, index = k >> NODE_LEVEL_SHIFT, k & ((1 << NODE_LEVEL_SHIFT) - 1)
                    raise LedgerIntegrityError(f"stored node (level {level}, index {index}) does not match the leaves")
            made.clear()
        i = j
    if frontier != state_frontier:
        raise LedgerIntegrityError("the sequencer's frontier does not match the stored leaves")
    root = CompactRange(size, frontier).root()
    if last is not None and old < size:
        proof = consistency_proof(s, old, size)
        try:
            verify_consistency(old, size, proof, last.root_hash, root)
        except InvalidProof as e:
            raise LedgerIntegrityError(
                f"no valid consistency proof from the checkpoint at size {old} to size {size}"
            ) from e
    return root


def sign_checkpoint(rt: Runtime, *, now: datetime | None = None) -> StoredCheckpoint:
    """Sign (and store) a checkpoint of the current tree, unless the latest one already has
    this size (then return it). Verifies the new tree extends the last signed one first
    (module docstring); raises :class:`LedgerIntegrityError` and signs nothing otherwise."""
    signer = rt.log_signer
    vkey = signer.verifier.vkey()
    with rt.tx() as s:
        st = _lock_state(s)
        if st.vkey is None:
            s.execute(update(_STATE).where(_STATE.c.id == 1).values(vkey=vkey))
        elif st.vkey != vkey:
            raise LedgerIntegrityError(
                "this replica's log key differs from the one that signed this ledger; copy "
                "log.key from the first replica's key directory (SOM_KEY_DIR)"
            )
        last = latest_checkpoint(s)
        size = int(st.size)
        kept = check_kept(rt, s, size, signer)  # before anything: never serve a rolled-back log
        if last is not None and last.size == size:
            return last
        if last is not None and last.size > size:
            raise LedgerIntegrityError(f"a checkpoint of size {last.size} exists but the log has only {size} leaves")
        try:
            root = _verify_extension(s, last, size, _split(st.frontier))
        except LedgerIntegrityError as e:
            log.error("refusing to sign a checkpoint of size %d: %s", size, e.message)
            raise
        if kept is not None and 0 < kept.size < size:
            try:
                verify_consistency(kept.size, size, consistency_proof(s, kept.size, size), kept.root_hash, root)
            except InvalidProof as e:
                raise LedgerIntegrityError(logguard.refusal(kept, size, behind=False)) from e
        cp = Checkpoint(rt.settings.log_origin, size, root)
        note = _sign_note(cp, signer)
        # kept before the note is stored or served (the state row lock orders the signers)
        logguard.write_kept(Path(rt.key_dir), rt.settings.log_origin, note, cp)
        created = now or utcnow()
        s.execute(insert(_CPS).values(size=size, root_hash=root, note=note.decode(), created_at=created))
        s.execute(update(_STATE).where(_STATE.c.id == 1).values(signed_size=size))
    log.info("signed checkpoint size=%d", size)
    return StoredCheckpoint(size, root, note, created)


def check_kept(rt: Runtime, s: Session, size: int, signer: NoteSigner) -> logguard.KeptCheckpoint | None:
    """The kept last-signed checkpoint (:mod:`marketplace.services.logguard`) after checking that
    the tree in the database (``size`` leaves) contains it; LedgerIntegrityError otherwise."""
    origin = rt.settings.log_origin
    try:
        kept = logguard.read_kept(Path(rt.key_dir), origin, signer.verifier)
    except ValueError as e:
        raise LedgerIntegrityError(str(e)) from e
    if kept is None:
        return None
    if kept.size > size:
        raise LedgerIntegrityError(logguard.refusal(kept, size, behind=True))
    if kept.size and root_at(s, kept.size) != kept.root_hash:
        raise LedgerIntegrityError(logguard.refusal(kept, size, behind=False))
    return kept


def check_on_start(rt: Runtime) -> None:
    """At start: refuse (LedgerIntegrityError) a database that lost signed history; keep the
    database's latest checkpoint when nothing is kept yet (a key directory from before). Without
    a log key yet, this key directory never signed: nothing to check."""
    if not (Path(rt.key_dir) / LOG_KEY_FILE).exists():
        return
    signer = rt.log_signer
    with rt.tx() as s:
        size = tree_size(s)
        kept = check_kept(rt, s, size, signer)
        last = latest_checkpoint(s)
    if kept is None and last is not None:
        try:
            cp = open_checkpoint(last.note, signer.verifier, origin=rt.settings.log_origin)
        except CryptoError:
            return  # signed under another origin or key: nothing of this log to keep
        logguard.write_kept(Path(rt.key_dir), cp.origin, last.note, cp)


def latest_or_sign(rt: Runtime) -> StoredCheckpoint:
    """The latest signed checkpoint, signing one (possibly of size 0) if there is none."""
    with rt.tx() as s:
        cp = latest_checkpoint(s)
    return cp if cp is not None else sign_checkpoint(rt)


def receipt(rt: Runtime, index: int) -> dict[str, Any]:
    """A receipt for leaf ``index``, verifiable offline with crypto only::

        {"index", "leaf": b64 leaf bytes, "leaf_hash": b64, "inclusion_proof": [b64],
         "checkpoint": "<signed note text>"}

    Signs a fresh checkpoint if none covers ``index`` yet. Call after the leaf's transaction
    committed. NotFound if there is no such leaf.
    """
    if type(index) is not int or index < 0:
        raise NotFound(f"no leaf {index!r}")
    with rt.tx() as s:
        cp = latest_checkpoint(s)
        if index >= tree_size(s):
            raise NotFound(f"no leaf {index}")
    if cp is None or cp.size <= index:
        cp = sign_checkpoint(rt)
    with rt.tx() as s:
        row = leaf_row(s, index)
        proof = inclusion_proof(s, index, cp.size)
    b64 = base64.b64encode
    return {
        "index": index,
        "leaf": b64(bytes(row.data)).decode(),
        "leaf_hash": b64(bytes(row.leaf_hash)).decode(),
        "inclusion_proof": [b64(p).decode() for p in proof],
        "checkpoint": cp.note.decode(),
    }


# ---------------------------------------------------------------------------- background signer


class Checkpointer:
    """Signs checkpoints in a background thread: every ``checkpoint_interval_seconds`` when there
    are new leaves, and soon after ``checkpoint_every`` leaves accumulate (appends wake it)."""

    def __init__(self, rt: Runtime, sessions: sessionmaker[Session]) -> None:
        """``sessions``: the runtime's session factory; a commit through it that leaves
        ``checkpoint_every`` or more unsigned leaves (:data:`~marketplace.services.ledger.tree.UNSIGNED_INFO`)
        wakes the thread."""
        self.rt = rt
        self.every = max(1, rt.settings.checkpoint_every)
        self.interval = max(0.05, rt.settings.checkpoint_interval_seconds)
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        event.listen(sessions, "after_commit", self._after_commit)
        event.listen(sessions, "after_rollback", self._after_rollback)

    def _after_commit(self, session: Session) -> None:
        unsigned = session.info.pop(UNSIGNED_INFO, None)
        if unsigned is not None and unsigned >= self.every:
            self.wake()

    @staticmethod
    def _after_rollback(session: Session) -> None:
        session.info.pop(UNSIGNED_INFO, None)

    def wake(self) -> None:
        self._wake.set()

    def start(self) -> None:
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="som-ledger-checkpointer", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None

    def pending(self) -> bool:
        with self.rt.sessions() as s:
            row = s.execute(select(_STATE.c.size, _STATE.c.signed_size).where(_STATE.c.id == 1)).one()
        return int(row.size) > int(row.signed_size) and int(row.size) > 0

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self.interval)
            self._wake.clear()
            if self._stop.is_set():
                break
            try:
                if self.pending():
                    sign_checkpoint(self.rt)
            except Exception:
                log.exception("background checkpoint failed")


def vkey(rt: Runtime) -> str:
    """The log's verifier key text (c2sp.org/signed-note vkey)."""
    return rt.log_signer.verifier.vkey()
