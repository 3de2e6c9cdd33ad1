"""monitoring: adoption per minute (from ledgered usage), latency per minute and process, roll-up
watermark, an index on usage_records.ledger_index

Revision ID: 0007_monitoring
Revises: 0005
"""

import sqlalchemy as sa
from alembic import op

revision = "0007_monitoring"
down_revision = "0006_auth"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "monitoring_latency",
        sa.Column("offering_id", sa.String(length=40), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("mode", sa.String(length=20), nullable=False),
        sa.Column("t", sa.BigInteger(), nullable=False),
        sa.Column("writer", sa.String(length=80), nullable=False),
        sa.Column("calls", sa.Integer(), nullable=False),
        sa.Column("errors", sa.JSON(), nullable=False),
        sa.Column("hist", sa.JSON(), nullable=False),
        sa.Column("sum_total", sa.Float(), nullable=False),
        sa.Column("sum_queue", sa.Float(), nullable=False),
        sa.Column("sum_model", sa.Float(), nullable=False),
        sa.Column("sum_overhead", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("offering_id", "version", "mode", "t", "writer", name=op.f("pk_monitoring_latency")),
    )
    op.create_index("ix_monitoring_latency_t", "monitoring_latency", ["t"], unique=False)
    op.create_table(
        "monitoring_state",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("last_index", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_monitoring_state")),
    )
    op.create_table(
        "monitoring_usage",
        sa.Column("offering_id", sa.String(length=40), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("mode", sa.String(length=20), nullable=False),
        sa.Column("t", sa.BigInteger(), nullable=False),
        sa.Column("provider_org_id", sa.String(length=40), nullable=False),
        sa.Column("calls", sa.Integer(), nullable=False),
        sa.Column("units", sa.BigInteger(), nullable=False),
        sa.Column("revenue", sa.JSON(), nullable=False),
        sa.Column("consumers", sa.JSON(), nullable=False),
        sa.Column("contracts", sa.JSON(), nullable=False),
        sa.Column("released", sa.Integer(), nullable=False),
        sa.Column("leaf_first", sa.BigInteger(), nullable=False),
        sa.Column("leaf_last", sa.BigInteger(), nullable=False),
        sa.Column("leaf_count", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("offering_id", "version", "mode", "t", name=op.f("pk_monitoring_usage")),
    )
    op.create_index(op.f("ix_monitoring_usage_provider_org_id"), "monitoring_usage", ["provider_org_id"], unique=False)
    op.create_index("ix_monitoring_usage_t", "monitoring_usage", ["t"], unique=False)
    with op.batch_alter_table("usage_records", schema=None) as batch_op:
        batch_op.create_index("ix_usage_records_ledger_index", ["ledger_index"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("usage_records", schema=None) as batch_op:
        batch_op.drop_index("ix_usage_records_ledger_index")
    op.drop_index("ix_monitoring_usage_t", table_name="monitoring_usage")
    op.drop_index(op.f("ix_monitoring_usage_provider_org_id"), table_name="monitoring_usage")
    op.drop_table("monitoring_usage")
    op.drop_table("monitoring_state")
    op.drop_index("ix_monitoring_latency_t", table_name="monitoring_latency")
    op.drop_table("monitoring_latency")
