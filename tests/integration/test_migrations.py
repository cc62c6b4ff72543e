"""The migrations build exactly the schema the models declare, on Postgres and SQLite alike.

Alembic compares the migrated database with ``SQLModel.metadata`` (columns, types, indexes,
constraints); any drift, e.g. a model changed without a migration, is listed by name. The
migrations also go down to nothing and back up on Postgres.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import text
from sqlmodel import SQLModel

import models.tables  # noqa: F401  (registers every table on SQLModel.metadata)
from worker.db import alembic_config, make_engine, upgrade

VERSIONS = "alembic_version"


def drift(url: str) -> list[Any]:
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            context = MigrationContext.configure(conn, opts={"compare_type": True})
            return [d for d in compare_metadata(context, SQLModel.metadata) if not ignored(d)]
    finally:
        engine.dispose()


def ignored(diff: Any) -> bool:
    """Alembic's own version table is not a model."""
    return isinstance(diff, tuple) and diff[:1] == ("remove_table",) and diff[1].name == VERSIONS


def test_postgres_schema_matches_the_models(pg_url: str) -> None:
    upgrade(pg_url)
    assert drift(pg_url) == []


def test_sqlite_schema_matches_the_models(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'store.db'}"
    upgrade(url)
    assert drift(url) == []


def test_postgres_migrations_go_down_and_up_again(pg_url: str) -> None:
    upgrade(pg_url)
    command.downgrade(alembic_config(pg_url), "base")
    engine = make_engine(pg_url)
    with engine.connect() as conn:
        tables = conn.execute(text("SELECT tablename FROM pg_tables WHERE schemaname = 'public'"))
        assert sorted(t for (t,) in tables) == ["alembic_version"]
    engine.dispose()
    upgrade(pg_url)
    assert drift(pg_url) == []
