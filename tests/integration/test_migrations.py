"""The migrations build exactly the schema the models declare, on Postgres and SQLite alike.

Alembic compares the migrated database with ``SQLModel.metadata`` (columns, types, indexes,
constraints); any drift, e.g. a model changed without a migration, is listed by name. The
migrations also go down to nothing and back up on Postgres.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import text
from sqlalchemy.dialects import postgresql
from sqlalchemy.exc import OperationalError
from sqlmodel import Session, SQLModel

import models.tables  # noqa: F401  (registers every table on SQLModel.metadata)
from tests.unit.test_events import BASE
from worker.db import alembic_config, make_engine, upgrade
from worker.ingest.store import ingest

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
    assert collated_c(pg_url) == declared_c()


def declared_c() -> set[tuple[str, str]]:
    """(table, column) of every column the models declare ``COLLATE "C"`` on Postgres
    (``models.tables.ident``)."""
    dialect = postgresql.dialect()
    return {
        (table.name, column.name)
        for table in SQLModel.metadata.tables.values()
        for column in table.columns
        if getattr(column.type.dialect_impl(dialect), "collation", None) == "C"
    }


def collated_c(url: str) -> set[tuple[str, str]]:
    """(table, column) of every column the store collates ``"C"``: alembic's comparison does
    not look at collations, so a migration that left one out would pass ``drift``."""
    engine = make_engine(url)
    sql = (
        "SELECT table_name, column_name FROM information_schema.columns"
        " WHERE table_schema = 'public' AND collation_name = 'C'"
    )
    try:
        with engine.connect() as conn:
            return {(t, c) for t, c in conn.execute(text(sql))}
    finally:
        engine.dispose()


def test_the_ids_and_keys_are_declared_byte_ordered() -> None:
    """Every id and key column the fold and ingest match on: the events', claims', pairs' and
    accumulators' (migration 0016)."""
    keys = ("subscriber_id", "group_id", "plan_year", "plan_type", "benefit_code")
    assert declared_c() == {
        *[(t, c) for t in ("received_event", "claim", "accumulator") for c in keys],
        ("received_event", "event_id"),
        ("received_event", "claim_id"),
        ("claim", "claim_id"),
        ("pair", "subscriber_id"),
        ("pair", "group_id"),
    }


def test_the_collation_migration_gives_up_behind_a_long_transaction(pg_url: str) -> None:
    """0016 rebuilds indexes under exclusive locks: behind a transaction reading ``claim``
    it gives up after its lock timeout and changes nothing (instead of queueing every worker
    behind its wait), and runs once that transaction has ended."""
    command.upgrade(alembic_config(pg_url), "0015")
    reader = make_engine(pg_url)
    try:
        with reader.connect() as conn:
            conn.execute(text("SELECT count(*) FROM claim"))  # holds its lock until rollback
            started = time.monotonic()
            with pytest.raises(OperationalError, match="lock timeout"):
                command.upgrade(alembic_config(pg_url), "head")
            waited = time.monotonic() - started
            conn.rollback()
    finally:
        reader.dispose()
    assert 9 < waited < 30, waited
    assert collated_c(pg_url) == set()
    upgrade(pg_url)
    assert collated_c(pg_url) == declared_c()


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
    assert collated_c(pg_url) == declared_c()


def store_at(store: str, revision: str, request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The URL of a fresh ``store`` ("postgres" or "sqlite") migrated up to ``revision``."""
    url = (
        request.getfixturevalue("pg_url")
        if store == "postgres"
        else f"sqlite:///{tmp_path / 's.db'}"
    )
    command.upgrade(alembic_config(url), revision)
    return url


@pytest.mark.parametrize("store", ["postgres", "sqlite"])
def test_keys_that_differ_only_in_case_are_merged_on_upgrade(
    store: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """Rows written before keys were canonical: `ded` and `DED ` of one member become one
    accumulator (ours and pushed summed, marked dirty), pairs too; claims are rewritten."""
    url = store_at(store, "0005", request, tmp_path)
    engine = make_engine(url)
    with engine.begin() as conn:
        for pid, group in ((1, "grp"), (2, "GRP ")):
            conn.execute(
                text(
                    "INSERT INTO pair (id, subscriber_id, group_id, attempts, lease_gen)"
                    " VALUES (:i, 's1', :g, 0, 0)"
                ),
                {"i": pid, "g": group},
            )
        for aid, pid, code, cents in ((1, 1, "ded", 1000), (2, 2, "DED ", 250)):
            conn.execute(
                text(
                    "INSERT INTO accumulator (id, pair_id, subscriber_id, group_id, plan_year,"
                    " plan_type, benefit_code, change_seq, pushed_seq, attempts, held,"
                    " deductible_total, deductible_in,"
                    " pushed_deductible_total, pushed_deductible_in) VALUES"
                    " (:a, :p, 's1', 'grp', '2026', 'med', :c, 3, 3, 0, false, :n, :n, :n, :n)"
                ),
                {"a": aid, "p": pid, "c": code, "n": cents},
            )
        conn.execute(
            text(
                "INSERT INTO claim (claim_id, version, content_hash, subscriber_id,"
                " group_id, plan_year, plan_type, benefit_code)"
                " VALUES ('c1', 0, 'h', 's1 ', 'grp', '2026', 'med', 'ded')"
            )
        )
    engine.dispose()
    upgrade(url)
    engine = make_engine(url)
    with engine.connect() as conn:
        accs = conn.execute(
            text(
                "SELECT pair_id, group_id, benefit_code, deductible_total,"
                " pushed_deductible_total, dirty_since, change_seq"
                " FROM accumulator"
            )
        ).all()
        pairs = conn.execute(text("SELECT id, subscriber_id, group_id FROM pair")).all()
        claims = conn.execute(
            text("SELECT subscriber_id, plan_type, benefit_code FROM claim")
        ).all()
    engine.dispose()
    ((pair_id, group, code, ours, pushed, dirty, seq),) = accs
    assert (pair_id, group, code, ours, pushed, seq) == (1, "GRP", "DED", 1250, 1250, 4)
    assert dirty is not None
    assert [tuple(p) for p in pairs] == [(1, "S1", "GRP")]
    assert [tuple(c) for c in claims] == [("S1", "MED", "DED")]


@pytest.mark.parametrize("store", ["postgres", "sqlite"])
def test_versions_received_before_0014_are_held_after_0017(
    store: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """Rows received before 0014 hold their versions with no batch. 0017 gives the first row of
    each such version a batch of its own, folded, and leaves every other row as it was; a later
    event of such a version with other content is then a conflict, as it was before, and not a
    new version for the fold."""
    url = store_at(store, "0016", request, tmp_path)
    engine = make_engine(url)
    received = text(
        "INSERT INTO received_event (event_id, claim_id, version, content_hash, received_at,"
        " batch_id) VALUES (:e, :c, :v, :h, CURRENT_TIMESTAMP, :b)"
    )
    with engine.begin() as conn:
        batch = conn.execute(
            text(
                "INSERT INTO ingest_batch (at, received, applied, duplicate, stale, conflict,"
                " invalid, duration_ms, folded_at)"
                " VALUES (CURRENT_TIMESTAMP, 2, 1, 1, 0, 0, 0, 3, CURRENT_TIMESTAMP) RETURNING id"
            )
        ).scalar_one()
        for row in (
            ("old-2", "c-old", 1, "h1", None),  # before 0014: two ids of one version
            ("old-1", "c-old", 1, "h1", None),
            ("old-3", "c-old", 2, "h2", None),
            ("new-1", "c-new", 1, "h3", batch),  # since 0014: a version and a second id of it
            ("new-2", "c-new", 1, "h3", None),
        ):
            conn.execute(received, dict(zip("ecvhb", row, strict=True)))
    engine.dispose()
    upgrade(url)
    assert drift(url) == []
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            rows = conn.execute(text("SELECT event_id, batch_id FROM received_event")).all()
            made = conn.execute(
                text("SELECT id, received, folded_at IS NOT NULL FROM ingest_batch WHERE id <> :b"),
                {"b": batch},
            ).all()
        with Session(engine) as session:
            clash = {**BASE, "event_id": "late", "claim_id": "c-old", "version": 1}
            result = ingest(session, [clash])
            session.commit()
    finally:
        engine.dispose()
    assert len(made) == 1, f"batches made for the versions received before 0014: {made}"
    ((held, nothing, folded),) = made
    assert (nothing, folded) == (0, True)
    assert sorted(map(tuple, rows)) == [
        ("new-1", batch),
        ("new-2", None),
        ("old-1", held),
        ("old-2", None),
        ("old-3", held),
    ]
    assert (result.conflict, result.recorded) == (1, 0), result
