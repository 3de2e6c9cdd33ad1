"""federated training: federations, participants, rounds

Revision ID: 0009_federated
Revises: 0008_sso
"""

import sqlalchemy as sa
from alembic import op

import marketplace.db.base

revision = "0009_federated"
down_revision = "0008_sso"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "federations",
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("offering_id", sa.String(length=40), nullable=False),
        sa.Column("org_id", sa.String(length=40), nullable=False),
        sa.Column("parent_version_id", sa.String(length=40), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("recipe", sa.JSON(), nullable=False),
        sa.Column("terms", sa.JSON(), nullable=False),
        sa.Column("status", sa.String(length=20), nullable=False),
        sa.Column("rounds_done", sa.Integer(), nullable=False),
        sa.Column("epsilon_spent", sa.Float(), nullable=False),
        sa.Column("result_version_id", sa.String(length=40), nullable=True),
        sa.Column("error", sa.String(length=2000), nullable=True),
        sa.Column("created_at", marketplace.db.base.UTCDateTime(), nullable=False),
        sa.Column("updated_at", marketplace.db.base.UTCDateTime(), nullable=False),
        sa.ForeignKeyConstraint(["offering_id"], ["offerings.id"], name=op.f("fk_federations_offering_id_offerings")),
        sa.ForeignKeyConstraint(["org_id"], ["orgs.id"], name=op.f("fk_federations_org_id_orgs")),
        sa.ForeignKeyConstraint(
            ["parent_version_id"],
            ["offering_versions.id"],
            name=op.f("fk_federations_parent_version_id_offering_versions"),
        ),
        sa.ForeignKeyConstraint(
            ["result_version_id"],
            ["offering_versions.id"],
            name=op.f("fk_federations_result_version_id_offering_versions"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_federations")),
    )
    op.create_index(op.f("ix_federations_offering_id"), "federations", ["offering_id"], unique=False)
    op.create_index(op.f("ix_federations_org_id"), "federations", ["org_id"], unique=False)
    op.create_table(
        "federation_participants",
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("federation_id", sa.String(length=40), nullable=False),
        sa.Column("org_id", sa.String(length=40), nullable=False),
        sa.Column("contract_id", sa.String(length=64), nullable=False),
        sa.Column("node_id", sa.BigInteger(), nullable=False),
        sa.Column("samples", sa.Integer(), nullable=False),
        sa.Column("rounds", sa.Integer(), nullable=False),
        sa.Column("units", sa.BigInteger(), nullable=False),
        sa.Column("credit_minor", sa.BigInteger(), nullable=False),
        sa.Column("epsilon_spent", sa.Float(), nullable=False),
        sa.Column("joined_at", marketplace.db.base.UTCDateTime(), nullable=False),
        sa.ForeignKeyConstraint(
            ["contract_id"], ["contracts.id"], name=op.f("fk_federation_participants_contract_id_contracts")
        ),
        sa.ForeignKeyConstraint(
            ["federation_id"], ["federations.id"], name=op.f("fk_federation_participants_federation_id_federations")
        ),
        sa.ForeignKeyConstraint(["org_id"], ["orgs.id"], name=op.f("fk_federation_participants_org_id_orgs")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_federation_participants")),
        sa.UniqueConstraint("federation_id", "org_id", name="uq_federation_participants_org"),
    )
    op.create_index(
        op.f("ix_federation_participants_federation_id"), "federation_participants", ["federation_id"], unique=False
    )
    op.create_index(op.f("ix_federation_participants_org_id"), "federation_participants", ["org_id"], unique=False)
    op.create_table(
        "federation_rounds",
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("federation_id", sa.String(length=40), nullable=False),
        sa.Column("number", sa.Integer(), nullable=False),
        sa.Column("participants", sa.JSON(), nullable=False),
        sa.Column("metrics", sa.JSON(), nullable=False),
        sa.Column("epsilon", sa.Float(), nullable=False),
        sa.Column("ledger_indexes", sa.JSON(), nullable=False),
        sa.Column("completed_at", marketplace.db.base.UTCDateTime(), nullable=False),
        sa.ForeignKeyConstraint(
            ["federation_id"], ["federations.id"], name=op.f("fk_federation_rounds_federation_id_federations")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_federation_rounds")),
        sa.UniqueConstraint("federation_id", "number", name="uq_federation_rounds_number"),
    )
    op.create_index(op.f("ix_federation_rounds_federation_id"), "federation_rounds", ["federation_id"], unique=False)


def downgrade() -> None:
    op.drop_table("federation_rounds")
    op.drop_table("federation_participants")
    op.drop_table("federations")
