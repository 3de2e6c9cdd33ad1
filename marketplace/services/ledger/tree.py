"""The ledger's Merkle tree in the database: one sequencer, O(log n) appends, proofs, reads.

For: appending leaves (usage records from metering, audit events, contract records; dicts built
by :mod:`contracts.records`) in the caller's transaction, and serving RFC 9162 inclusion and
consistency proofs and roots from the stored nodes. Not for: signing checkpoints and receipts
(:mod:`marketplace.services.ledger.checkpoints`), what a leaf means (:mod:`contracts.compliance`
checks that offline), offline verification (``crypto.logverify``), HTTP
(``marketplace.api.routes_ledger``).

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
* **Waking the signer.** An append leaves the number of unsigned leaves in ``session.info``
  (:data:`UNSIGNED_INFO`); the runtime's :class:`~marketplace.services.ledger.checkpoints.Checkpointer`
  reads it after the commit.
"""

from __future__ import annotations

import hashlib
import json
import operator
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from sqlalchemy import Table, or_, select, update
from sqlalchemy.orm import Session

from contracts.errors import ContractError
from contracts.records import USAGE_SCHEMA, validate_record
from crypto.canonical import canonicalize
from crypto.merkle import (
    HASH_SIZE,
    NodeId,
    consistency_plan,
    inclusion_plan,
    root_plan,
)
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

if TYPE_CHECKING:
    from marketplace.runtime import Runtime

__all__ = [
    "UNSIGNED_INFO",
    "LeafRef",
    "LedgerIntegrityError",
    "append",
    "append_many",
    "consistency_proof",
    "find_leaf",
    "inclusion_proof",
    "iter_leaves",
    "leaf_row",
    "root_at",
    "tree_size",
]

_STATE: Table = LedgerState.__table__  # type: ignore[assignment]
_LEAVES: Table = LedgerLeaf.__table__  # type: ignore[assignment]
_NODES: Table = LedgerNode.__table__  # type: ignore[assignment]
_CPS: Table = LedgerCheckpoint.__table__  # type: ignore[assignment]
_sha256 = hashlib.sha256
#: ``session.info`` key: leaves not yet covered by a signed checkpoint after this transaction.
UNSIGNED_INFO = "ledger.unsigned"


class LedgerIntegrityError(MarketplaceError):
    """The stored tree does not match the signed history; the log refuses to sign (HTTP 503)."""

    status: ClassVar[int] = 503
    code: ClassVar[str] = "ledger_integrity"


@dataclass(frozen=True)
class LeafRef:
    """Where a leaf landed: its gapless index and RFC 9162 leaf hash."""

    index: int
    leaf_hash: bytes


# ---------------------------------------------------------------------------- appends


def _node_key(n: NodeId) -> int:
    return n.index if n.level == 0 else (n.level << NODE_LEVEL_SHIFT) | n.index


def _split(frontier: bytes) -> list[bytes]:
    return [frontier[i : i + HASH_SIZE] for i in range(0, len(frontier), HASH_SIZE)]


def _fold(size: int, frontier: list[bytes], leaf_hashes: Iterable[bytes], nodes: list[tuple[int, bytes]]) -> int:
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
    session.execute(update(_STATE).where(_STATE.c.id == 1).values(size=size, frontier=b"".join(frontier)))
    session.info[UNSIGNED_INFO] = size - max(int(st.signed_size), 0)
    return [LeafRef(i, p[0]) for i, p in enumerate(prepared, start)]


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
    q_low = select(c.idx, c.leaf_hash).where(or_(*(c.idx.between(a, b - 1) for a, b in _spans(small))))
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
