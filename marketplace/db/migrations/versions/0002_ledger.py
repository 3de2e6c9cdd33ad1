"""ledger: sequencer state, leaves, Merkle nodes, signed checkpoints

Revision ID: 0002
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op

import marketplace.db.base

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

Key64 = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    state = op.create_table(
        "ledger_state",
        sa.Column("id", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.Column("frontier", sa.LargeBinary(), nullable=False),
        sa.Column("signed_size", sa.BigInteger(), nullable=False),
        sa.Column("vkey", sa.String(length=200), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_ledger_state")),
    )
    op.bulk_insert(state, [{"id": 1, "size": 0, "frontier": b"", "signed_size": -1, "vkey": None}])
    op.create_table(
        "ledger_leaves",
        sa.Column("idx", Key64, autoincrement=False, nullable=False),
        sa.Column("leaf_hash", sa.LargeBinary(length=32), nullable=False),
        sa.Column("leaf_hash_prefix", sa.BigInteger(), nullable=False),
        sa.Column("data", sa.LargeBinary(), nullable=False),
        sa.Column("schema", sa.String(length=40), nullable=False),
        sa.Column("contract_id", sa.String(length=256), nullable=True),
        sa.Column("offering_id", sa.String(length=256), nullable=True),
        sa.Column("consumer_org", sa.String(length=256), nullable=True),
        sa.Column("provider_org", sa.String(length=256), nullable=True),
        sa.Column("mode", sa.String(length=20), nullable=True),
        sa.Column("outcome", sa.String(length=20), nullable=True),
        sa.Column("units", sa.BigInteger(), nullable=True),
        sa.Column("amount_minor", sa.BigInteger(), nullable=True),
        sa.Column("currency", sa.String(length=3), nullable=True),
        sa.Column("time", sa.String(length=32), nullable=True),
        sa.PrimaryKeyConstraint("idx", name=op.f("pk_ledger_leaves")),
    )
    with op.batch_alter_table("ledger_leaves", schema=None) as batch_op:
        batch_op.create_index("ix_ledger_leaves_contract_id", ["contract_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_ledger_leaves_leaf_hash_prefix"), ["leaf_hash_prefix"], unique=False)
    op.create_table(
        "ledger_nodes",
        sa.Column("id", Key64, autoincrement=False, nullable=False),
        sa.Column("hash", sa.LargeBinary(length=32), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_ledger_nodes")),
    )
    op.create_table(
        "ledger_checkpoints",
        sa.Column("size", Key64, autoincrement=False, nullable=False),
        sa.Column("root_hash", sa.LargeBinary(length=32), nullable=False),
        sa.Column("note", sa.Text(), nullable=False),
        sa.Column("created_at", marketplace.db.base.UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("size", name=op.f("pk_ledger_checkpoints")),
    )


def downgrade() -> None:
    op.drop_table("ledger_checkpoints")
    op.drop_table("ledger_nodes")
    with op.batch_alter_table("ledger_leaves", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_ledger_leaves_leaf_hash_prefix"))
        batch_op.drop_index("ix_ledger_leaves_contract_id")
    op.drop_table("ledger_leaves")
    op.drop_table("ledger_state")
