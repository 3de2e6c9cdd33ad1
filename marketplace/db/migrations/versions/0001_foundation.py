"""foundation: orgs, api keys, offerings, versions, artifacts, audit

Revision ID: 0001
Revises:
"""

import sqlalchemy as sa
from alembic import op

import marketplace.db.base

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:

    op.create_table(
        "audit_events",
        sa.Column("seq", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("time", marketplace.db.base.UTCDateTime(), nullable=False),
        sa.Column("actor", sa.String(length=80), nullable=False),
        sa.Column("org_id", sa.String(length=40), nullable=True),
        sa.Column("action", sa.String(length=60), nullable=False),
        sa.Column("target", sa.String(length=200), nullable=False),
        sa.Column("outcome", sa.String(length=20), nullable=False),
        sa.Column("request_id", sa.String(length=80), nullable=False),
        sa.Column("detail", sa.JSON(), nullable=False),
        sa.PrimaryKeyConstraint("seq", name=op.f("pk_audit_events")),
        sa.UniqueConstraint("id", name=op.f("uq_audit_events_id")),
    )
    with op.batch_alter_table("audit_events", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_audit_events_action"), ["action"], unique=False)
        batch_op.create_index(batch_op.f("ix_audit_events_org_id"), ["org_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_audit_events_time"), ["time"], unique=False)

    op.create_table(
        "orgs",
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("created_at", marketplace.db.base.UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_orgs")),
        sa.UniqueConstraint("name", name=op.f("uq_orgs_name")),
    )
    op.create_table(
        "api_keys",
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("org_id", sa.String(length=40), nullable=False),
        sa.Column("prefix", sa.String(length=32), nullable=False),
        sa.Column("hash", sa.String(length=200), nullable=False),
        sa.Column("roles", sa.JSON(), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("kind", sa.String(length=20), nullable=False),
        sa.Column("offering_ids", sa.JSON(), nullable=True),
        sa.Column("created_at", marketplace.db.base.UTCDateTime(), nullable=False),
        sa.Column("expires_at", marketplace.db.base.UTCDateTime(), nullable=False),
        sa.Column("revoked_at", marketplace.db.base.UTCDateTime(), nullable=True),
        sa.Column("created_by", sa.String(length=40), nullable=True),
        sa.ForeignKeyConstraint(["org_id"], ["orgs.id"], name=op.f("fk_api_keys_org_id_orgs")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_api_keys")),
        sa.UniqueConstraint("prefix", name=op.f("uq_api_keys_prefix")),
    )
    with op.batch_alter_table("api_keys", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_api_keys_org_id"), ["org_id"], unique=False)

    op.create_table(
        "offerings",
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("org_id", sa.String(length=40), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("description", sa.Text(), nullable=False),
        sa.Column("model_card", sa.Text(), nullable=False),
        sa.Column("task", sa.String(length=60), nullable=False),
        sa.Column("input_schema", sa.JSON(), nullable=False),
        sa.Column("output_schema", sa.JSON(), nullable=False),
        sa.Column("tags", sa.JSON(), nullable=False),
        sa.Column("licence", sa.String(length=100), nullable=False),
        sa.Column("hosting", sa.String(length=20), nullable=False),
        sa.Column("status", sa.String(length=20), nullable=False),
        sa.Column("created_at", marketplace.db.base.UTCDateTime(), nullable=False),
        sa.Column("updated_at", marketplace.db.base.UTCDateTime(), nullable=False),
        sa.ForeignKeyConstraint(["org_id"], ["orgs.id"], name=op.f("fk_offerings_org_id_orgs")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_offerings")),
    )
    with op.batch_alter_table("offerings", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_offerings_org_id"), ["org_id"], unique=False)
        batch_op.create_index("ix_offerings_status_task", ["status", "task"], unique=False)

    op.create_table(
        "offering_versions",
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("offering_id", sa.String(length=40), nullable=False),
        sa.Column("number", sa.Integer(), nullable=False),
        sa.Column("format", sa.String(length=10), nullable=False),
        sa.Column("digest", sa.String(length=80), nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.Column("input_shape", sa.JSON(), nullable=False),
        sa.Column("info", sa.JSON(), nullable=False),
        sa.Column("he_plan", sa.JSON(), nullable=True),
        sa.Column("he_report", sa.JSON(), nullable=True),
        sa.Column("created_at", marketplace.db.base.UTCDateTime(), nullable=False),
        sa.ForeignKeyConstraint(
            ["offering_id"], ["offerings.id"], name=op.f("fk_offering_versions_offering_id_offerings")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_offering_versions")),
    )
    with op.batch_alter_table("offering_versions", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_offering_versions_offering_id"), ["offering_id"], unique=False)

    op.create_table(
        "artifacts",
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("version_id", sa.String(length=40), nullable=False),
        sa.Column("purpose", sa.String(length=20), nullable=False),
        sa.Column("blob", sa.String(length=80), nullable=False),
        sa.Column("wrapped_key", sa.LargeBinary(), nullable=False),
        sa.Column("kek_id", sa.String(length=80), nullable=False),
        sa.Column("aad", sa.String(length=200), nullable=False),
        sa.Column("created_at", marketplace.db.base.UTCDateTime(), nullable=False),
        sa.ForeignKeyConstraint(
            ["version_id"], ["offering_versions.id"], name=op.f("fk_artifacts_version_id_offering_versions")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_artifacts")),
    )
    with op.batch_alter_table("artifacts", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_artifacts_version_id"), ["version_id"], unique=False)


def downgrade() -> None:

    with op.batch_alter_table("artifacts", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_artifacts_version_id"))

    op.drop_table("artifacts")
    with op.batch_alter_table("offering_versions", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_offering_versions_offering_id"))

    op.drop_table("offering_versions")
    with op.batch_alter_table("offerings", schema=None) as batch_op:
        batch_op.drop_index("ix_offerings_status_task")
        batch_op.drop_index(batch_op.f("ix_offerings_org_id"))

    op.drop_table("offerings")
    with op.batch_alter_table("api_keys", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_api_keys_org_id"))

    op.drop_table("api_keys")
    op.drop_table("orgs")
    with op.batch_alter_table("audit_events", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_audit_events_time"))
        batch_op.drop_index(batch_op.f("ix_audit_events_org_id"))
        batch_op.drop_index(batch_op.f("ix_audit_events_action"))

    op.drop_table("audit_events")
