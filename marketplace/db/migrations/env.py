"""Alembic environment: runs against the engine passed in ``config.attributes['engine']``."""

from __future__ import annotations

from alembic import context

import marketplace.db.all_models  # noqa: F401  (registers every table on Base.metadata)
from marketplace.db.base import Base

config = context.config
engine = config.attributes["engine"]

with engine.connect() as connection:
    context.configure(
        connection=connection,
        target_metadata=Base.metadata,
        render_as_batch=connection.dialect.name == "sqlite",
    )
    with context.begin_transaction():
        context.run_migrations()
    connection.commit()
