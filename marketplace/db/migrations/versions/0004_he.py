"""he: consumers' key sets, public plans of provider-hosted offerings

Revision ID: 0004
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op

import marketplace.db.base

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "he_keysets",
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("org_id", sa.String(length=40), nullable=False),
        sa.Column("offering_id", sa.String(length=40), nullable=False),
        sa.Column("contract_id", sa.String(length=64), nullable=False),
        sa.Column("plan_digest", sa.String(length=80), nullable=False),
        sa.Column("blob", sa.String(length=80), nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.Column("layouts", sa.JSON(), nullable=False),
        sa.Column("created_by", sa.String(length=40), nullable=False),
        sa.Column("created_at", marketplace.db.base.UTCDateTime(), nullable=False),
        sa.Column("revoked_at", marketplace.db.base.UTCDateTime(), nullable=True),
        sa.Column("revoked_reason", sa.String(length=60), nullable=True),
        sa.ForeignKeyConstraint(["offering_id"], ["offerings.id"], name=op.f("fk_he_keysets_offering_id_offerings")),
        sa.ForeignKeyConstraint(["org_id"], ["orgs.id"], name=op.f("fk_he_keysets_org_id_orgs")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_he_keysets")),
    )
    with op.batch_alter_table("he_keysets", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_he_keysets_contract_id"), ["contract_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_he_keysets_offering_id"), ["offering_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_he_keysets_org_id"), ["org_id"], unique=False)
        batch_op.create_index("ix_he_keysets_org_contract", ["org_id", "contract_id"], unique=False)

    op.create_table(
        "he_agent_plans",
        sa.Column("offering_id", sa.String(length=40), nullable=False),
        sa.Column("plan", sa.JSON(), nullable=False),
        sa.Column("report", sa.JSON(), nullable=True),
        sa.Column("digest", sa.String(length=80), nullable=False),
        sa.Column("updated_at", marketplace.db.base.UTCDateTime(), nullable=False),
        sa.ForeignKeyConstraint(
            ["offering_id"], ["offerings.id"], name=op.f("fk_he_agent_plans_offering_id_offerings")
        ),
        sa.PrimaryKeyConstraint("offering_id", name=op.f("pk_he_agent_plans")),
    )


def downgrade() -> None:
    op.drop_table("he_agent_plans")
    with op.batch_alter_table("he_keysets", schema=None) as batch_op:
        batch_op.drop_index("ix_he_keysets_org_contract")
        batch_op.drop_index(batch_op.f("ix_he_keysets_org_id"))
        batch_op.drop_index(batch_op.f("ix_he_keysets_offering_id"))
        batch_op.drop_index(batch_op.f("ix_he_keysets_contract_id"))
    op.drop_table("he_keysets")
