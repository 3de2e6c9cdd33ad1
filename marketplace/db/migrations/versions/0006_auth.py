"""auth: api_keys.created_by is the parent key (foreign key, indexed) for the revocation cascade

Revision ID: 0006_auth
Revises: 0005
"""

from alembic import op

revision = "0006_auth"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("api_keys", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_api_keys_created_by"), ["created_by"], unique=False)
        batch_op.create_foreign_key(batch_op.f("fk_api_keys_created_by_api_keys"), "api_keys", ["created_by"], ["id"])


def downgrade() -> None:
    with op.batch_alter_table("api_keys", schema=None) as batch_op:
        batch_op.drop_constraint(batch_op.f("fk_api_keys_created_by_api_keys"), type_="foreignkey")
        batch_op.drop_index(batch_op.f("ix_api_keys_created_by"))
