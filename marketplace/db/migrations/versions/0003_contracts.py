"""contracts and metering: offers, contracts, contract events, usage records, idempotency keys

Revision ID: 0003
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op

import marketplace.db.base

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "idempotency_keys",
        sa.Column("org_id", sa.String(length=40), nullable=False),
        sa.Column("key_digest", sa.String(length=80), nullable=False),
        sa.Column("request_digest", sa.String(length=80), nullable=False),
        sa.Column("usage_id", sa.String(length=40), nullable=False),
        sa.Column("contract_id", sa.String(length=64), nullable=False),
        sa.Column("state", sa.String(length=20), nullable=False),
        sa.Column("created_at", marketplace.db.base.UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("org_id", "key_digest", name=op.f("pk_idempotency_keys")),
    )
    op.create_table(
        "offers",
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("offering_id", sa.String(length=40), nullable=False),
        sa.Column("provider_org_id", sa.String(length=40), nullable=False),
        sa.Column("provider_key", sa.String(length=80), nullable=False),
        sa.Column("digest", sa.String(length=80), nullable=False),
        sa.Column("record", sa.JSON(), nullable=False),
        sa.Column("status", sa.String(length=20), nullable=False),
        sa.Column("created_at", marketplace.db.base.UTCDateTime(), nullable=False),
        sa.ForeignKeyConstraint(["offering_id"], ["offerings.id"], name=op.f("fk_offers_offering_id_offerings")),
        sa.ForeignKeyConstraint(["provider_org_id"], ["orgs.id"], name=op.f("fk_offers_provider_org_id_orgs")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_offers")),
        sa.UniqueConstraint("digest", name=op.f("uq_offers_digest")),
    )
    op.create_index(op.f("ix_offers_offering_id"), "offers", ["offering_id"], unique=False)
    op.create_index(op.f("ix_offers_provider_org_id"), "offers", ["provider_org_id"], unique=False)
    op.create_table(
        "contracts",
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("offer_id", sa.String(length=64), nullable=False),
        sa.Column("offering_id", sa.String(length=40), nullable=False),
        sa.Column("provider_org_id", sa.String(length=40), nullable=False),
        sa.Column("consumer_org_id", sa.String(length=40), nullable=False),
        sa.Column("consumer_key", sa.String(length=80), nullable=False),
        sa.Column("record", sa.JSON(), nullable=False),
        sa.Column("digest", sa.String(length=80), nullable=False),
        sa.Column("terms", sa.JSON(), nullable=False),
        sa.Column("status", sa.String(length=20), nullable=False),
        sa.Column("seq", sa.Integer(), nullable=False),
        sa.Column("head", sa.String(length=80), nullable=False),
        sa.Column("head_time", marketplace.db.base.UTCDateTime(), nullable=False),
        sa.Column("accepted_at", marketplace.db.base.UTCDateTime(), nullable=False),
        sa.Column("ledger_index", sa.Integer(), nullable=True),
        sa.Column("used_units", sa.Integer(), nullable=False),
        sa.Column("reserved_units", sa.Integer(), nullable=False),
        sa.Column("window_units", sa.Integer(), nullable=False),
        sa.Column("window_start", marketplace.db.base.UTCDateTime(), nullable=True),
        sa.Column("created_at", marketplace.db.base.UTCDateTime(), nullable=False),
        sa.Column("updated_at", marketplace.db.base.UTCDateTime(), nullable=False),
        sa.ForeignKeyConstraint(["consumer_org_id"], ["orgs.id"], name=op.f("fk_contracts_consumer_org_id_orgs")),
        sa.ForeignKeyConstraint(["offer_id"], ["offers.id"], name=op.f("fk_contracts_offer_id_offers")),
        sa.ForeignKeyConstraint(["offering_id"], ["offerings.id"], name=op.f("fk_contracts_offering_id_offerings")),
        sa.ForeignKeyConstraint(["provider_org_id"], ["orgs.id"], name=op.f("fk_contracts_provider_org_id_orgs")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_contracts")),
    )
    op.create_index("ix_contracts_consumer_offering", "contracts", ["consumer_org_id", "offering_id"], unique=False)
    op.create_index(op.f("ix_contracts_consumer_org_id"), "contracts", ["consumer_org_id"], unique=False)
    op.create_index(op.f("ix_contracts_offer_id"), "contracts", ["offer_id"], unique=False)
    op.create_index(op.f("ix_contracts_offering_id"), "contracts", ["offering_id"], unique=False)
    op.create_index(op.f("ix_contracts_provider_org_id"), "contracts", ["provider_org_id"], unique=False)
    op.create_table(
        "contract_events",
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("contract_id", sa.String(length=64), nullable=False),
        sa.Column("seq", sa.Integer(), nullable=False),
        sa.Column("kind", sa.String(length=20), nullable=False),
        sa.Column("by", sa.String(length=20), nullable=False),
        sa.Column("digest", sa.String(length=80), nullable=False),
        sa.Column("record", sa.JSON(), nullable=False),
        sa.Column("time", marketplace.db.base.UTCDateTime(), nullable=False),
        sa.Column("ledger_index", sa.Integer(), nullable=True),
        sa.Column("created_at", marketplace.db.base.UTCDateTime(), nullable=False),
        sa.ForeignKeyConstraint(
            ["contract_id"], ["contracts.id"], name=op.f("fk_contract_events_contract_id_contracts")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_contract_events")),
        sa.UniqueConstraint("contract_id", "seq", name="uq_contract_events_seq"),
    )
    op.create_index(op.f("ix_contract_events_contract_id"), "contract_events", ["contract_id"], unique=False)
    op.create_table(
        "usage_records",
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("contract_id", sa.String(length=64), nullable=False),
        sa.Column("offering_id", sa.String(length=40), nullable=False),
        sa.Column("consumer_org_id", sa.String(length=40), nullable=False),
        sa.Column("provider_org_id", sa.String(length=40), nullable=False),
        sa.Column("mode", sa.String(length=20), nullable=False),
        sa.Column("job_kind", sa.String(length=20), nullable=True),
        sa.Column("keyset_id", sa.String(length=64), nullable=True),
        sa.Column("units", sa.Integer(), nullable=False),
        sa.Column("state", sa.String(length=20), nullable=False),
        sa.Column("idempotency_key_digest", sa.String(length=80), nullable=False),
        sa.Column("request_digest", sa.String(length=80), nullable=False),
        sa.Column("reserved_at", marketplace.db.base.UTCDateTime(), nullable=False),
        sa.Column("window_start", marketplace.db.base.UTCDateTime(), nullable=False),
        sa.Column("lease_expires_at", marketplace.db.base.UTCDateTime(), nullable=False),
        sa.Column("finished_at", marketplace.db.base.UTCDateTime(), nullable=True),
        sa.Column("release_reason", sa.String(length=200), nullable=True),
        sa.Column("result_blob", sa.String(length=80), nullable=True),
        sa.Column("result_inline", sa.LargeBinary(), nullable=True),
        sa.Column("result_media_type", sa.String(length=100), nullable=True),
        sa.Column("ledger_index", sa.Integer(), nullable=True),
        sa.Column("record", sa.JSON(), nullable=True),
        sa.ForeignKeyConstraint(["contract_id"], ["contracts.id"], name=op.f("fk_usage_records_contract_id_contracts")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_usage_records")),
    )
    op.create_index(op.f("ix_usage_records_consumer_org_id"), "usage_records", ["consumer_org_id"], unique=False)
    op.create_index("ix_usage_records_contract_state", "usage_records", ["contract_id", "state"], unique=False)
    op.create_index("ix_usage_records_contract_time", "usage_records", ["contract_id", "reserved_at"], unique=False)
    op.create_index(op.f("ix_usage_records_provider_org_id"), "usage_records", ["provider_org_id"], unique=False)


def downgrade() -> None:
    # ### commands auto generated by Alembic - please adjust! ###
    op.drop_index(op.f("ix_usage_records_provider_org_id"), table_name="usage_records")
    op.drop_index("ix_usage_records_contract_time", table_name="usage_records")
    op.drop_index("ix_usage_records_contract_state", table_name="usage_records")
    op.drop_index(op.f("ix_usage_records_consumer_org_id"), table_name="usage_records")
    op.drop_table("usage_records")
    op.drop_index(op.f("ix_contract_events_contract_id"), table_name="contract_events")
    op.drop_table("contract_events")
    op.drop_index(op.f("ix_contracts_provider_org_id"), table_name="contracts")
    op.drop_index(op.f("ix_contracts_offering_id"), table_name="contracts")
    op.drop_index(op.f("ix_contracts_offer_id"), table_name="contracts")
    op.drop_index(op.f("ix_contracts_consumer_org_id"), table_name="contracts")
    op.drop_index("ix_contracts_consumer_offering", table_name="contracts")
    op.drop_table("contracts")
    op.drop_index(op.f("ix_offers_provider_org_id"), table_name="offers")
    op.drop_index(op.f("ix_offers_offering_id"), table_name="offers")
    op.drop_table("offers")
    op.drop_table("idempotency_keys")
