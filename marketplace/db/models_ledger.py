"""Ledger tables: the sequencer's state row, leaves, perfect-subtree nodes, signed checkpoints.

For: :mod:`marketplace.services.ledger`, which reads and writes these with Core statements (the
ORM classes exist for the metadata and for readability). Not for: anything else; no other module
writes these tables, and rows are only ever inserted (the state row is updated under its lock).

Layout:

* ``ledger_state``: exactly one row (``id = 1``), locked by every append (``SELECT ... FOR UPDATE``
  on PostgreSQL; SQLite's ``BEGIN IMMEDIATE`` already serializes writers). It holds the tree size,
  its compact range (right frontier, ``size.bit_count()`` 32-byte hashes concatenated), the size of
  the last signed checkpoint, and the vkey of the key that signs (replicas must share it).
* ``ledger_leaves``: one row per leaf: gapless ``idx``, the exact bytes that were hashed
  (RFC 8785 canonical JSON), the RFC 9162 leaf hash, its first 8 bytes as a signed 64-bit
  integer (``leaf_hash_prefix``, indexed: finding a leaf by hash is an integer index lookup
  and a comparison of the full hash; an index on the 32-byte hash itself cost more than all
  the rest of an append), and a few columns copied from usage leaves for compliance filters
  (never payloads).
* ``ledger_nodes``: every completed perfect subtree at level ``NODE_MIN_LEVEL`` (4) or above,
  keyed by ``(level << 48) | index``. A subtree below that level spans at most 16 leaves; its
  hash is recomputed from their ``leaf_hash`` when a proof needs it (in the same query as the
  stored nodes), so the table holds 1/16 as many rows as the leaves, not one per leaf.
* ``ledger_checkpoints``: every signed checkpoint note, by tree size.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import BigInteger, Index, Integer, LargeBinary, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from marketplace.db.base import Base, UTCDateTime, utcnow

__all__ = [
    "NODE_LEVEL_SHIFT",
    "NODE_MIN_LEVEL",
    "LedgerCheckpoint",
    "LedgerLeaf",
    "LedgerNode",
    "LedgerState",
    "leaf_hash_prefix",
]

# Node keys: (level << 48) | index. 2**48 leaves is far beyond any ledger this service will hold.
NODE_LEVEL_SHIFT = 48
# Perfect subtrees of 2**NODE_MIN_LEVEL leaves or more are stored; smaller ones are recomputed.
NODE_MIN_LEVEL = 4


def leaf_hash_prefix(leaf_hash: bytes) -> int:
    """The indexed lookup key of a leaf hash: its first 8 bytes, big-endian, signed 64-bit."""
    return int.from_bytes(leaf_hash[:8], "big", signed=True)


# 64-bit keys; on SQLite an INTEGER PRIMARY KEY (the rowid itself, also 64-bit) is much faster.
Key64 = BigInteger().with_variant(Integer(), "sqlite")


class LedgerState(Base):
    __tablename__ = "ledger_state"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    size: Mapped[int] = mapped_column(BigInteger, default=0)
    frontier: Mapped[bytes] = mapped_column(LargeBinary, default=b"")
    signed_size: Mapped[int] = mapped_column(BigInteger, default=-1)
    vkey: Mapped[str | None] = mapped_column(String(200), nullable=True)


class LedgerLeaf(Base):
    __tablename__ = "ledger_leaves"

    idx: Mapped[int] = mapped_column(Key64, primary_key=True, autoincrement=False)
    leaf_hash: Mapped[bytes] = mapped_column(LargeBinary(32))
    leaf_hash_prefix: Mapped[int] = mapped_column(BigInteger, index=True)
    data: Mapped[bytes] = mapped_column(LargeBinary)
    schema: Mapped[str] = mapped_column(String(40))
    # Copied from som.usage/v1 leaves (NULL for other schemas) for filters and totals.
    contract_id: Mapped[str | None] = mapped_column(String(256), nullable=True)
    offering_id: Mapped[str | None] = mapped_column(String(256), nullable=True)
    consumer_org: Mapped[str | None] = mapped_column(String(256), nullable=True)
    provider_org: Mapped[str | None] = mapped_column(String(256), nullable=True)
    mode: Mapped[str | None] = mapped_column(String(20), nullable=True)
    outcome: Mapped[str | None] = mapped_column(String(20), nullable=True)
    units: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    amount_minor: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    currency: Mapped[str | None] = mapped_column(String(3), nullable=True)
    time: Mapped[str | None] = mapped_column(String(32), nullable=True)  # RFC 3339, sortable

    __table_args__ = (Index("ix_ledger_leaves_contract_id", "contract_id"),)


class LedgerNode(Base):
    __tablename__ = "ledger_nodes"

    id: Mapped[int] = mapped_column(Key64, primary_key=True, autoincrement=False)
    hash: Mapped[bytes] = mapped_column(LargeBinary(32))


class LedgerCheckpoint(Base):
    __tablename__ = "ledger_checkpoints"

    size: Mapped[int] = mapped_column(Key64, primary_key=True, autoincrement=False)
    root_hash: Mapped[bytes] = mapped_column(LargeBinary(32))
    note: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
