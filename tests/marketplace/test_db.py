"""Database: migrations match the models on SQLite and PostgreSQL, `som db upgrade`, WAL mode."""

from __future__ import annotations

from pathlib import Path

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect, text
from typer.testing import CliRunner

import marketplace.db.all_models  # noqa: F401
from marketplace.cli import app as cli_app
from marketplace.db.base import Base
from marketplace.db.session import alembic_config, make_engine, upgrade


def _only_head(engine) -> str:
    """The migrations form one linear history: exactly one head."""
    from alembic.script import ScriptDirectory

    heads = ScriptDirectory.from_config(alembic_config(engine)).get_heads()
    assert len(heads) == 1, f"the Alembic history has branched: heads {heads}"
    return heads[0]


def test_migrations_match_the_models(db_url: str) -> None:
    engine = make_engine(db_url)
    try:
        upgrade(engine)
        upgrade(engine)  # idempotent
        with engine.connect() as conn:
            ctx = MigrationContext.configure(conn, opts={"compare_type": False})
            diff = compare_metadata(ctx, Base.metadata)
        assert diff == [], f"models and migrations disagree: {diff}"
        assert set(Base.metadata.tables) <= set(inspect(engine).get_table_names())
    finally:
        engine.dispose()


def test_som_db_upgrade_and_wal(tmp_path: Path) -> None:
    data = tmp_path / "data"
    r = CliRunner().invoke(cli_app, ["db", "upgrade", "--data-dir", str(data)], env={"DATABASE_URL": ""})
    assert r.exit_code == 0, r.output
    engine = make_engine(f"sqlite:///{data / 'som.db'}")
    try:
        names = set(inspect(engine).get_table_names())
        assert {"orgs", "api_keys", "offerings", "audit_events", "alembic_version"} <= names
        with engine.connect() as conn:
            assert conn.execute(text("PRAGMA journal_mode")).scalar() == "wal"
            heads = {row[0] for row in conn.execute(text("SELECT version_num FROM alembic_version"))}
        assert heads == {_only_head(engine)}, heads
    finally:
        engine.dispose()
