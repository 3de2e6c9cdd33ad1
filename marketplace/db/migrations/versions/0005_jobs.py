"""jobs and agents: remote-execution jobs, provider agents, agent tasks

Revision ID: 0005
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op

import marketplace.db.base

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "agent_tasks",
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("offering_id", sa.String(length=40), nullable=False),
        sa.Column("kind", sa.String(length=20), nullable=False),
        sa.Column("status", sa.String(length=20), nullable=False),
        sa.Column("payload_blob", sa.String(length=80), nullable=False),
        sa.Column("meta", sa.JSON(), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("lease_owner", sa.String(length=60), nullable=True),
        sa.Column("lease_expires_at", marketplace.db.base.UTCDateTime(), nullable=True),
        sa.Column("result_blob", sa.String(length=80), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("created_at", marketplace.db.base.UTCDateTime(), nullable=False),
        sa.Column("deadline_at", marketplace.db.base.UTCDateTime(), nullable=False),
        sa.ForeignKeyConstraint(["offering_id"], ["offerings.id"], name=op.f("fk_agent_tasks_offering_id_offerings")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_agent_tasks")),
    )
    op.create_index(op.f("ix_agent_tasks_deadline_at"), "agent_tasks", ["deadline_at"], unique=False)
    op.create_index(op.f("ix_agent_tasks_offering_id"), "agent_tasks", ["offering_id"], unique=False)
    op.create_index("ix_agent_tasks_status_offering", "agent_tasks", ["status", "offering_id"], unique=False)
    op.create_table(
        "agents",
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("org_id", sa.String(length=40), nullable=False),
        sa.Column("key_id", sa.String(length=40), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("offering_ids", sa.JSON(), nullable=False),
        sa.Column("seal_public", sa.String(length=80), nullable=False),
        sa.Column("seal_statements", sa.JSON(), nullable=True),
        sa.Column("capabilities", sa.JSON(), nullable=False),
        sa.Column("created_at", marketplace.db.base.UTCDateTime(), nullable=False),
        sa.Column("last_seen_at", marketplace.db.base.UTCDateTime(), nullable=False),
        sa.Column("stopped_at", marketplace.db.base.UTCDateTime(), nullable=True),
        sa.ForeignKeyConstraint(["key_id"], ["api_keys.id"], name=op.f("fk_agents_key_id_api_keys")),
        sa.ForeignKeyConstraint(["org_id"], ["orgs.id"], name=op.f("fk_agents_org_id_orgs")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_agents")),
    )
    op.create_index(op.f("ix_agents_key_id"), "agents", ["key_id"], unique=False)
    op.create_index(op.f("ix_agents_last_seen_at"), "agents", ["last_seen_at"], unique=False)
    op.create_index(op.f("ix_agents_org_id"), "agents", ["org_id"], unique=False)
    op.create_table(
        "jobs",
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("org_id", sa.String(length=40), nullable=False),
        sa.Column("submitted_by", sa.String(length=40), nullable=False),
        sa.Column("offering_id", sa.String(length=40), nullable=False),
        sa.Column("provider_org_id", sa.String(length=40), nullable=False),
        sa.Column("hosting", sa.String(length=20), nullable=False),
        sa.Column("kind", sa.String(length=20), nullable=False),
        sa.Column("status", sa.String(length=20), nullable=False),
        sa.Column("seal_public", sa.String(length=80), nullable=False),
        sa.Column("seal_statement", sa.JSON(), nullable=True),
        sa.Column("input_blob", sa.String(length=80), nullable=False),
        sa.Column("input_size", sa.BigInteger(), nullable=False),
        sa.Column("input_digest", sa.String(length=80), nullable=False),
        sa.Column("code", sa.Text(), nullable=True),
        sa.Column("code_digest", sa.String(length=80), nullable=True),
        sa.Column("units", sa.Integer(), nullable=False),
        sa.Column("limits", sa.JSON(), nullable=False),
        sa.Column("idempotency_key", sa.String(length=200), nullable=False),
        sa.Column("request_digest", sa.String(length=80), nullable=False),
        sa.Column("contract_id", sa.String(length=40), nullable=True),
        sa.Column("reservation", sa.JSON(), nullable=True),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("max_attempts", sa.Integer(), nullable=False),
        sa.Column("lease_owner", sa.String(length=60), nullable=True),
        sa.Column("lease_expires_at", marketplace.db.base.UTCDateTime(), nullable=True),
        sa.Column("finishing", sa.Boolean(), nullable=False),
        sa.Column("result_blob", sa.String(length=80), nullable=True),
        sa.Column("result_size", sa.BigInteger(), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("error_reason", sa.String(length=40), nullable=True),
        sa.Column("usage_id", sa.String(length=60), nullable=True),
        sa.Column("receipt", sa.JSON(), nullable=True),
        sa.Column("charged", sa.Boolean(), nullable=False),
        sa.Column("decided_by", sa.String(length=40), nullable=True),
        sa.Column("created_at", marketplace.db.base.UTCDateTime(), nullable=False),
        sa.Column("updated_at", marketplace.db.base.UTCDateTime(), nullable=False),
        sa.Column("started_at", marketplace.db.base.UTCDateTime(), nullable=True),
        sa.Column("finished_at", marketplace.db.base.UTCDateTime(), nullable=True),
        sa.Column("deadline_at", marketplace.db.base.UTCDateTime(), nullable=False),
        sa.Column("result_expires_at", marketplace.db.base.UTCDateTime(), nullable=True),
        sa.Column("fetched_at", marketplace.db.base.UTCDateTime(), nullable=True),
        sa.ForeignKeyConstraint(["offering_id"], ["offerings.id"], name=op.f("fk_jobs_offering_id_offerings")),
        sa.ForeignKeyConstraint(["org_id"], ["orgs.id"], name=op.f("fk_jobs_org_id_orgs")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_jobs")),
    )
    op.create_index(op.f("ix_jobs_lease_expires_at"), "jobs", ["lease_expires_at"], unique=False)
    op.create_index(op.f("ix_jobs_offering_id"), "jobs", ["offering_id"], unique=False)
    op.create_index(op.f("ix_jobs_org_id"), "jobs", ["org_id"], unique=False)
    op.create_index("ix_jobs_org_idem", "jobs", ["org_id", "idempotency_key"], unique=True)
    op.create_index(op.f("ix_jobs_provider_org_id"), "jobs", ["provider_org_id"], unique=False)
    op.create_index("ix_jobs_status_offering", "jobs", ["status", "offering_id"], unique=False)


def downgrade() -> None:
    op.drop_index("ix_jobs_status_offering", table_name="jobs")
    op.drop_index(op.f("ix_jobs_provider_org_id"), table_name="jobs")
    op.drop_index("ix_jobs_org_idem", table_name="jobs")
    op.drop_index(op.f("ix_jobs_org_id"), table_name="jobs")
    op.drop_index(op.f("ix_jobs_offering_id"), table_name="jobs")
    op.drop_index(op.f("ix_jobs_lease_expires_at"), table_name="jobs")
    op.drop_table("jobs")
    op.drop_index(op.f("ix_agents_org_id"), table_name="agents")
    op.drop_index(op.f("ix_agents_last_seen_at"), table_name="agents")
    op.drop_index(op.f("ix_agents_key_id"), table_name="agents")
    op.drop_table("agents")
    op.drop_index("ix_agent_tasks_status_offering", table_name="agent_tasks")
    op.drop_index(op.f("ix_agent_tasks_offering_id"), table_name="agent_tasks")
    op.drop_index(op.f("ix_agent_tasks_deadline_at"), table_name="agent_tasks")
    op.drop_table("agent_tasks")
