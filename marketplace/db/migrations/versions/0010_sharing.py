"""sharing: teams, team members, grants; offering visibility; private offers; version metadata,
validation reports; the version a contract pinned at acceptance

Revision ID: 0010_sharing
Revises: 0009_federated
"""

import sqlalchemy as sa
from alembic import op

import marketplace.db.base

revision = "0010_sharing"
down_revision = "0009_federated"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "teams",
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("org_id", sa.String(length=40), nullable=False),
        sa.Column("name", sa.String(length=100), nullable=False),
        sa.Column("created_at", marketplace.db.base.UTCDateTime(), nullable=False),
        sa.ForeignKeyConstraint(["org_id"], ["orgs.id"], name=op.f("fk_teams_org_id_orgs")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_teams")),
        sa.UniqueConstraint("org_id", "name", name="uq_teams_org_name"),
    )
    with op.batch_alter_table("teams", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_teams_org_id"), ["org_id"], unique=False)
    op.create_table(
        "team_members",
        sa.Column("team_id", sa.String(length=40), nullable=False),
        sa.Column("member_id", sa.String(length=40), nullable=False),
        sa.Column("created_at", marketplace.db.base.UTCDateTime(), nullable=False),
        sa.ForeignKeyConstraint(["team_id"], ["teams.id"], name=op.f("fk_team_members_team_id_teams")),
        sa.PrimaryKeyConstraint("team_id", "member_id", name=op.f("pk_team_members")),
    )
    with op.batch_alter_table("team_members", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_team_members_member_id"), ["member_id"], unique=False)
    op.create_table(
        "grants",
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("offering_id", sa.String(length=40), nullable=False),
        sa.Column("org_id", sa.String(length=40), nullable=False),
        sa.Column("team_id", sa.String(length=40), nullable=True),
        sa.Column("permission", sa.String(length=10), nullable=False),
        sa.Column("created_by", sa.String(length=40), nullable=False),
        sa.Column("created_at", marketplace.db.base.UTCDateTime(), nullable=False),
        sa.ForeignKeyConstraint(["offering_id"], ["offerings.id"], name=op.f("fk_grants_offering_id_offerings")),
        sa.ForeignKeyConstraint(["org_id"], ["orgs.id"], name=op.f("fk_grants_org_id_orgs")),
        sa.ForeignKeyConstraint(["team_id"], ["teams.id"], name=op.f("fk_grants_team_id_teams")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_grants")),
        sa.UniqueConstraint("offering_id", "org_id", "team_id", name="uq_grants_grantee"),
    )
    with op.batch_alter_table("grants", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_grants_offering_id"), ["offering_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_grants_org_id"), ["org_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_grants_team_id"), ["team_id"], unique=False)
    with op.batch_alter_table("offerings", schema=None) as batch_op:
        batch_op.add_column(sa.Column("visibility", sa.String(length=20), server_default="public", nullable=False))
    with op.batch_alter_table("offering_versions", schema=None) as batch_op:
        batch_op.add_column(sa.Column("meta", sa.JSON(), nullable=True))
        batch_op.add_column(sa.Column("validation", sa.JSON(), nullable=True))
    with op.batch_alter_table("offers", schema=None) as batch_op:
        batch_op.add_column(sa.Column("addressed_to", sa.JSON(), nullable=True))
    with op.batch_alter_table("contracts", schema=None) as batch_op:
        batch_op.add_column(sa.Column("version_number", sa.Integer(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("contracts", schema=None) as batch_op:
        batch_op.drop_column("version_number")
    with op.batch_alter_table("offers", schema=None) as batch_op:
        batch_op.drop_column("addressed_to")
    with op.batch_alter_table("offering_versions", schema=None) as batch_op:
        batch_op.drop_column("validation")
        batch_op.drop_column("meta")
    with op.batch_alter_table("offerings", schema=None) as batch_op:
        batch_op.drop_column("visibility")
    op.drop_table("grants")
    op.drop_table("team_members")
    op.drop_table("teams")
