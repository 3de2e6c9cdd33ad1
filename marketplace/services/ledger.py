"""The tamper-evident usage ledger: one sequencer, an RFC 9162 Merkle tree in the DB, signed
checkpoints, proofs and receipts.

For: appending leaves (usage records from metering, audit events, contract records; dicts built
by :mod:`contracts.records`) in the caller's transaction, signing C2SP checkpoints with the log's
Ed25519 key, serving inclusion/consistency proofs and receipts. Not for: what a leaf means
(:mod:`contracts.compliance` checks that offline), offline verification (``crypto.logverify``),
HTTP (``marketplace.api.routes_ledger``).

How it works (docs/ledger.md has the long version):

* **One sequencer.** Every append locks the single ``ledger_state`` row (``SELECT ... FOR UPDATE``
  on PostgreSQL; on SQLite every transaction is ``BEGIN IMMEDIATE``), so indexes are gapless and
  there is one order even with several API replicas on one database.
* **O(log n) appends.** The state row holds the tree's compact range (right frontier). An append
  folds the new leaf hash into it and inserts the perfect-subtree nodes it completes at level
  ``NODE_MIN_LEVEL`` (4) or above (one row per 16 leaves); the tree is never recomputed from all
  leaves. A batch is one ``executemany`` for its leaves and one for its nodes.
* **O(log n) proofs.** :func:`crypto.merkle.inclusion_plan` / ``consistency_plan`` / ``root_plan``
  name the perfect subtrees a proof needs; stored ones and the leaf hashes under the unstored
  small ones (at most 16 leaves each) are read in one query, then folded.
* **The log never signs two inconsistent checkpoints.** Before signing size ``n`` after the last
  signed size ``m``: the stored nodes must still give the root signed at ``m``; the leaves in
  ``[m, n)`` are re-hashed from their bytes and replayed onto the frontier at ``m``, and every
  node they complete must equal the stored one; the result must equal the state's frontier; and
  a consistency proof built from stored nodes must verify from ``m`` to ``n``. Otherwise
  :class:`LedgerIntegrityError` and nothing is signed.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import operator
import os
import threading
import weakref
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from sqlalchemy import Engine, Table, event, insert, or_, select, update
from sqlalchemy.orm import Session

from contracts.errors import ContractError
from contracts.records import USAGE_SCHEMA, audit_record, validate_record
from crypto.canonical import canonicalize
from crypto.checkpoint import Checkpoint, open_checkpoint
from crypto.checkpoint import sign_checkpoint as _sign_note
from crypto.errors import CryptoError, InvalidProof
from crypto.merkle import (
    HASH_SIZE,
    CompactRange,
    NodeId,
    consistency_plan,
    inclusion_plan,
    root_plan,
    verify_consistency,
)
from crypto.note import ALG_ED25519, NoteSigner
from crypto.signing import SigningKey
from marketplace.db.base import utcnow
from marketplace.db.models import AuditEvent
from marketplace.db.models_ledger import (
    NODE_LEVEL_SHIFT,
    NODE_MIN_LEVEL,
    LedgerCheckpoint,
    LedgerLeaf,
    LedgerNode,
    LedgerState,
    leaf_hash_prefix,
)
from marketplace.errors import MarketplaceError, NotFound
from marketplace.services import logguard

if TYPE_CHECKING:
    from marketplace.runtime import Runtime

__all__ = [
    "Checkpointer",
    "LeafRef",
    "LedgerIntegrityError",
    "StoredCheckpoint",
    "append",
    "append_many",
    "audit_leaf_sink",
    "checkpoint_at",
    "consistency_proof",
    "find_leaf",
    "inclusion_proof",
    "install",
    "iter_leaves",
    "latest_checkpoint",
    "latest_or_sign",
    "leaf_row",
    "log_signer",
    "receipt",
    "root_at",
    "sign_checkpoint",
    "tree_size",
    "vkey",
]

log = logging.getLogger("som.ledger")

_STATE: Table = LedgerState.__table__  # type: ignore[assignment]
_LEAVES: Table = LedgerLeaf.__table__  # type: ignore[assignment]
_NODES: Table = LedgerNode.__table__  # type: ignore[assignment]
_CPS: Table = LedgerCheckpoint.__table__  # type: ignore[assignment]
_sha256 = hashlib.sha256
_VERIFY_BATCH = 20_000
_SIGNER_KEY = "ledger.signer"


class LedgerIntegrityError(MarketplaceError):
    """The stored tree does not match the signed history; the log refuses to sign (HTTP 503)."""

    status: ClassVar[int] = 503
    code: ClassVar[str] = "ledger_integrity"


@dataclass(frozen=True)
class LeafRef:
    """Where a leaf landed: its gapless index and RFC 9162 leaf hash."""

    index: int
    leaf_hash: bytes


@dataclass(frozen=True)
class StoredCheckpoint:
    """A signed checkpoint as stored: tree size, root hash, the signed note, when."""

    size: int
    root_hash: bytes
    note: bytes
    created_at: datetime


# ---------------------------------------------------------------------------- appends


def _node_key(n: NodeId) -> int:
    return n.index if n.level == 0 else (n.level << NODE_LEVEL_SHIFT) | n.index


def _split(frontier: bytes) -> list[bytes]:
    return [frontier[i : i + HASH_SIZE] for i in range(0, len(frontier), HASH_SIZE)]


def _fold(
    size: int, frontier: list[bytes], leaf_hashes: Iterable[bytes], nodes: list[tuple[int, bytes]]
) -> int:
    """Append leaf hashes to the compact range ``(size, frontier)`` (largest subtree first,
    changed in place; RFC 9162 §2.1.1 hashing, as :class:`crypto.merkle.CompactRange`; the
    property tests check the stored tree against the reference one). Every completed perfect subtree at level
    ``NODE_MIN_LEVEL`` or above is added to ``nodes`` as ``(key, hash)``. Returns the new size.
    The appends' hot loop: plain ints and bytes, no objects per node."""
    sha, pop, push, add = _sha256, frontier.pop, frontier.append, nodes.append
    lo, shift = NODE_MIN_LEVEL, NODE_LEVEL_SHIFT
    for h in leaf_hashes:
        idx, level = size, 0
        size += 1
        while idx & 1:
            h = sha(b"\x01" + pop() + h).digest()  # RFC 9162 §2.1.1: SHA-256(0x01 || l || r)
            idx >>= 1
            level += 1
            if level >= lo:
                add(((level << shift) | idx, h))
        push(h)
    return size


def _subtree_hash(hashes: Sequence[bytes]) -> bytes:
    """MTH of a perfect subtree (2**k leaves) from its leaf hashes."""
    sha = _sha256
    level = list(hashes)
    while len(level) > 1:
        level = [sha(b"\x01" + level[i] + level[i + 1]).digest() for i in range(0, len(level), 2)]
    return level[0]


_USAGE_COLS = (
    "contract_id",
    "offering_id",
    "consumer_org",
    "provider_org",
    "mode",
    "outcome",
    "units",
    "amount_minor",
    "currency",
    "time",
)


_LEAF_COLS = ("idx", "leaf_hash", "leaf_hash_prefix", "data", "schema", *_USAGE_COLS)
_NO_USAGE = (None,) * len(_USAGE_COLS)
_SQL_CACHE: dict[str, tuple[str, str]] = {}


def _insert_sql(paramstyle: str) -> tuple[str, str]:
    """Driver-level INSERTs (executemany of tuples: the hot path of appends)."""
    got = _SQL_CACHE.get(paramstyle)
    if got is None:
        ph = "?" if paramstyle == "qmark" else "%s"
        cols, marks = ", ".join(_LEAF_COLS), ", ".join([ph] * len(_LEAF_COLS))
        leaves = f"INSERT INTO {_LEAVES.name} ({cols}) VALUES ({marks})"  # noqa: S608 (constants)
        nodes = f"INSERT INTO {_NODES.name} (id, hash) VALUES ({ph}, {ph})"  # noqa: S608
        got = _SQL_CACHE[paramstyle] = (leaves, nodes)
    return got


#: A leaf ready to store: its hash and its row without the index
#: (``leaf_hash, leaf_hash_prefix, data, schema, *usage columns``).
Prepared = tuple[bytes, tuple[Any, ...]]
_usage_cols = operator.itemgetter(*_USAGE_COLS)
# A validated som.usage/v1 record is flat: the schema's fixed ASCII keys, each value an exact
# ``str`` that is printable (so no lone surrogates) or an exact ``int`` in [0, 2**53 - 1]. For
# such a dict RFC 8785 output is exactly this encoding: it is what crypto.canonical.canonicalize
# returns for it, after re-checking every value (its own fast path; tests/marketplace/
# test_ledger_fastpaths.py checks the two agree). Appends skip that second check.
_usage_json = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode


def _prepare(record: Mapping[str, Any]) -> Prepared:
    """Validate, canonicalize and hash one record (outside the lock)."""
    if not isinstance(record, dict):
        raise TypeError(f"record must be a dict from contracts.records, got {type(record).__name__}")
    try:
        validate_record(record)
    except ContractError as e:
        raise ValueError(f"not a ledger record: {e}") from e
    schema = record["schema"]
    if schema != USAGE_SCHEMA:
        data, cols = canonicalize(record), _NO_USAGE
    elif type(record) is dict:
        data, cols = _usage_json(record).encode(), _usage_cols(record)
    else:  # a dict subclass: crypto.canonical decides
        data, cols = canonicalize(record), _usage_cols(record)
    h = _sha256(b"\x00" + data).digest()  # RFC 9162 §2.1.1 leaf hash
    return h, (h, leaf_hash_prefix(h), data, schema, *cols)


def _lock_state(s: Session) -> Any:
    """The state row, locked until the end of the caller's transaction (the sequencer)."""
    stmt = select(_STATE).where(_STATE.c.id == 1).with_for_update()
    row = s.execute(stmt).one_or_none()
    if row is None:  # pragma: no cover - the migration inserts it
        raise LedgerIntegrityError("ledger_state row is missing: run `som db upgrade`")
    return row


def append(session: Session, record: dict[str, Any]) -> LeafRef:
    """Append one leaf in the caller's transaction; see :func:`append_many`."""
    return append_many(session, [record])[0]


def append_many(session: Session, records: Sequence[dict[str, Any]]) -> list[LeafRef]:
    """Append leaves in order in the caller's transaction; return where each landed.

    Each record is a dict from :mod:`contracts.records` (``ValueError`` if it is not a valid
    leaf). It is RFC 8785-canonicalized (those exact bytes are hashed and stored), the sequencer
    lock is taken, the next gapless indexes assigned, the leaves and the Merkle nodes they
    complete inserted and the frontier updated. Commits or rolls back with the caller.
    """
    if not records:
        return []
    return _append_prepared(session, [_prepare(r) for r in records])


def _append_prepared(session: Session, prepared: Sequence[Prepared]) -> list[LeafRef]:
    st = _lock_state(session)
    start = int(st.size)
    frontier = _split(st.frontier)
    if len(frontier) != start.bit_count():
        raise LedgerIntegrityError(f"the sequencer's frontier does not fit its size {start}")
    node_rows: list[tuple[int, bytes]] = []
    size = _fold(start, frontier, [p[0] for p in prepared], node_rows)
    leaf_rows = [(i, *p[1]) for i, p in enumerate(prepared, start)]
    conn = session.connection()
    leaves_sql, nodes_sql = _insert_sql(conn.dialect.paramstyle)
    conn.exec_driver_sql(leaves_sql, leaf_rows)
    if node_rows:
        conn.exec_driver_sql(nodes_sql, node_rows)
    session.execute(
        update(_STATE).where(_STATE.c.id == 1).values(size=size, frontier=b"".join(frontier))
    )
    _maybe_notify(session, size, st.signed_size)
    return [LeafRef(i, p[0]) for i, p in enumerate(prepared, start)]


def audit_leaf_sink(session: Session, ev: AuditEvent) -> None:
    """``audit.set_leaf_sink`` hook: every audit event becomes a ``som.audit/v1`` leaf in the
    emitting transaction. Stateless (uses only the session), so apps sharing a process are fine."""
    append(
        session,
        audit_record(
            event_id=ev.id,
            actor=ev.actor,
            org=ev.org_id,
            action=ev.action,
            target=ev.target or None,
            outcome=ev.outcome,
            request_id=ev.request_id or None,
            time=ev.time,
        ),
    )


# ---------------------------------------------------------------------------- reads and proofs


def tree_size(s: Session) -> int:
    """Leaves committed so far (no lock)."""
    return int(s.execute(select(_STATE.c.size).where(_STATE.c.id == 1)).scalar_one())


def _spans(ids: Sequence[NodeId]) -> list[tuple[int, int]]:
    """The leaf ranges ``[a, b)`` under the unstored (small) subtrees of ``ids``, merged."""
    out: list[tuple[int, int]] = []
    for a, b in sorted((n.index << n.level, (n.index + 1) << n.level) for n in ids):
        if out and a <= out[-1][1]:
            out[-1] = (out[-1][0], max(b, out[-1][1]))
        else:
            out.append((a, b))
    return out


def _fetch(s: Session, ids: Sequence[NodeId]) -> list[bytes]:
    """Hashes of the perfect subtrees ``ids`` (same order), in one query: stored nodes at level
    ``NODE_MIN_LEVEL`` and above, and the leaf hashes under the smaller ones (at most
    ``2**NODE_MIN_LEVEL - 1`` leaves each), which are folded here."""
    if not ids:
        return []
    small = [n for n in ids if n.level < NODE_MIN_LEVEL]
    high = [_node_key(n) for n in ids if n.level >= NODE_MIN_LEVEL]
    c = _LEAVES.c
    q_low = select(c.idx, c.leaf_hash).where(
        or_(*(c.idx.between(a, b - 1) for a, b in _spans(small)))
    )
    q_high = select(_NODES.c.id, _NODES.c.hash).where(_NODES.c.id.in_(high))
    q = q_low.union_all(q_high) if small and high else (q_low if small else q_high)
    # Leaf indexes are < 2**48 <= every stored node key, so one dict holds both.
    got: dict[int, bytes] = {int(k): bytes(h) for k, h in s.execute(q).all()}
    out: list[bytes] = []
    try:
        for n in ids:
            if n.level >= NODE_MIN_LEVEL:
                out.append(got[_node_key(n)])
            elif n.level == 0:
                out.append(got[n.index])
            else:
                a = n.index << n.level
                out.append(_subtree_hash([got[i] for i in range(a, a + (1 << n.level))]))
    except KeyError as e:
        raise LedgerIntegrityError(f"stored Merkle node or leaf {e.args[0]:#x} is missing") from None
    return out


def _check_size(s: Session, size: int) -> None:
    have = tree_size(s)
    if size > have:
        raise NotFound(f"the log has {have} leaves, not {size}")


def inclusion_proof(s: Session, index: int, size: int) -> list[bytes]:
    """RFC 9162 §2.1.3 inclusion proof of leaf ``index`` in the tree of ``size`` (O(log n))."""
    _check_size(s, size)
    plan = inclusion_plan(index, size)
    return plan.rehash(_fetch(s, plan.ids))


def consistency_proof(s: Session, size1: int, size2: int) -> list[bytes]:
    """RFC 9162 §2.1.4 consistency proof from ``size1`` to ``size2``. From size 0 (or between
    equal sizes) the proof is empty, as c2sp.org/tlog-witness expects."""
    if not 0 <= size1 <= size2:
        raise ValueError(f"need 0 <= size1 <= size2, got {size1}, {size2}")
    _check_size(s, size2)
    if size1 == 0:
        return []
    plan = consistency_plan(size1, size2)
    return plan.rehash(_fetch(s, plan.ids))


def root_at(s: Session, size: int) -> bytes:
    """``MTH(D[0:size])`` from stored nodes (O(log n))."""
    _check_size(s, size)
    plan = root_plan(size)
    return plan.rehash(_fetch(s, plan.ids))[0]


def leaf_row(s: Session, index: int) -> Any:
    """The stored leaf row (``idx``, ``data``, ``leaf_hash``, usage columns); NotFound if none."""
    row = s.execute(select(_LEAVES).where(_LEAVES.c.idx == index)).one_or_none()
    if row is None:
        raise NotFound(f"no leaf {index}")
    return row


def find_leaf(s: Session, leaf_hash: bytes) -> int:
    """The lowest index whose leaf hash is ``leaf_hash``; NotFound if none."""
    c = _LEAVES.c
    idx = s.execute(
        select(c.idx)
        .where(c.leaf_hash_prefix == leaf_hash_prefix(leaf_hash), c.leaf_hash == leaf_hash)
        .order_by(c.idx)
        .limit(1)
    ).scalar()
    if idx is None:
        raise NotFound("no leaf with that hash")
    return int(idx)


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


def iter_leaves(rt: Runtime, start: int, end: int, *, batch: int = 5000) -> Iterator[tuple[int, bytes]]:
    """``(index, leaf bytes)`` for ``[start, end)``, in short transactions of ``batch`` rows."""
    i = start
    while i < end:
        j = min(end, i + batch)
        with rt.sessions() as s:
            rows = s.execute(
                select(_LEAVES.c.idx, _LEAVES.c.data)
                .where(_LEAVES.c.idx >= i, _LEAVES.c.idx < j)
                .order_by(_LEAVES.c.idx)
            ).all()
        for idx, data in rows:
            yield int(idx), bytes(data)
        i = j


# ---------------------------------------------------------------------------- signing


def _skey_text(name: str, key: SigningKey) -> str:
    # Go sumdb/note private key text: PRIVATE+KEY+name+hex(key id)+base64(0x01 || seed).
    signer = NoteSigner(name, key)
    seed = bytes([ALG_ED25519]) + key.unsafe_private_bytes()
    return f"PRIVATE+KEY+{name}+{signer.key_id.hex()}+{base64.b64encode(seed).decode()}\n"


def _load_or_create_key(path: Path, name: str) -> NoteSigner:
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


def log_signer(rt: Runtime) -> NoteSigner:
    """The log's Ed25519 note signer from ``<key_dir>/log.key`` (0600; created on first use,
    named after ``settings.log_origin``; the key directory is outside the data directory,
    :mod:`marketplace.custody`). Every replica of one ledger must share this file."""
    signer: NoteSigner | None = rt.extras.get(_SIGNER_KEY)
    if signer is None:
        from marketplace.custody import LOG_KEY_FILE

        signer = _load_or_create_key(Path(rt.key_dir) / LOG_KEY_FILE, rt.settings.log_origin)
        rt.extras[_SIGNER_KEY] = signer
    return signer


def _verify_extension(
    s: Session, last: StoredCheckpoint | None, size: int, state_frontier: list[bytes]
) -> bytes:
    """Recompute the root at ``size`` from the signed history; raise LedgerIntegrityError."""
    old = 0 if last is None else last.size
    old_ids = root_plan(old).ids  # smallest subtree first
    old_hashes = _fetch(s, old_ids)
    if last is not None and root_plan(old).rehash(old_hashes)[0] != last.root_hash:
        raise LedgerIntegrityError(
            f"the stored tree no longer gives the root signed at size {old}: nodes were changed"
        )
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
                int(k): bytes(h)
                for k, h in s.execute(select(_NODES.c.id, _NODES.c.hash).where(_NODES.c.id.in_(keys)))
            }
            for k, h in made:
                if stored_nodes.get(k) != h:
                    level, index = k >> NODE_LEVEL_SHIFT, k & ((1 << NODE_LEVEL_SHIFT) - 1)
                    raise LedgerIntegrityError(
                        f"stored node (level {level}, index {index}) does not match the leaves"
                    )
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
    signer = log_signer(rt)
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
            raise LedgerIntegrityError(
                f"a checkpoint of size {last.size} exists but the log has only {size} leaves"
            )
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
        s.execute(
            insert(_CPS).values(size=size, root_hash=root, note=note.decode(), created_at=created)
        )
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
    from marketplace.custody import LOG_KEY_FILE  # as in log_signer (custody imports settings only)

    if not (Path(rt.key_dir) / LOG_KEY_FILE).exists():
        return
    signer = log_signer(rt)
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

    def __init__(self, rt: Runtime) -> None:
        self.rt = rt
        self.every = max(1, rt.settings.checkpoint_every)
        self.interval = max(0.05, rt.settings.checkpoint_interval_seconds)
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

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


_checkpointers: weakref.WeakKeyDictionary[Engine, Checkpointer] = weakref.WeakKeyDictionary()


def _maybe_notify(session: Session, size: int, signed_size: int) -> None:
    bind = session.get_bind()
    cp = _checkpointers.get(bind) if isinstance(bind, Engine) else None
    if cp is None or size - max(signed_size, 0) < cp.every or session.info.get("ledger.notify"):
        return
    session.info["ledger.notify"] = True

    def _after(sess: Session) -> None:
        sess.info.pop("ledger.notify", None)
        cp.wake()

    event.listen(session, "after_commit", _after, once=True)


def install(rt: Runtime) -> Checkpointer:
    """Register this runtime's background signer (started/stopped by the caller)."""
    cp = _checkpointers.get(rt.engine)
    if cp is None:
        cp = Checkpointer(rt)
        _checkpointers[rt.engine] = cp
    return cp


def vkey(rt: Runtime) -> str:
    """The log's verifier key text (c2sp.org/signed-note vkey)."""
    return log_signer(rt).verifier.vkey()
