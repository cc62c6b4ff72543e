"""The ledger's central property on the Postgres store, whose bulk writes are its own code path.

The same random deliveries as ``tests/unit/test_ledger_properties.py`` (SQLite), cut into random
batches and ingested into a real Postgres database, emptied between examples: the accumulators
equal the independent oracle to the cent, whatever the order, duplication and batching.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import Engine, text

from tests.services import create_database, drop_database
from tests.stack import Stack, same_totals
from tests.unit.test_ledger_properties import deliveries, ingest_in_batches
from worker.db import make_engine, upgrade
from worker.demo.streams import StreamSpec, expected_totals, generate
from worker.store.bulk import statement

TABLES = "received_event, claim, accumulator, pair, dead_letter, ingest_batch"


@pytest.fixture(scope="module")
def pg_store(postgres: str) -> Iterator[tuple[str, Engine]]:
    name, url = create_database()
    upgrade(url)
    engine = make_engine(url)
    yield url, engine
    engine.dispose()
    drop_database(name)


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(case=deliveries(), cuts=st.lists(st.integers(1, 10), min_size=1, max_size=6))
def test_postgres_store_equals_the_oracle_across_batches(
    tmp_path_factory: pytest.TempPathFactory,
    pg_store: tuple[str, Engine],
    case: Any,
    cuts: list[int],
) -> None:
    url, engine = pg_store
    with engine.begin() as conn:
        conn.execute(text(f"TRUNCATE {TABLES} RESTART IDENTITY CASCADE"))
    events, delivered = case
    ingest_in_batches(engine, delivered, cuts)
    stack = Stack(tmp_path_factory.mktemp("props"), database_url=url)
    assert same_totals(stack.totals(), expected_totals(events)) == []


def test_statements_are_built_once_per_shape(pg_store: tuple[str, Engine]) -> None:
    """More batches build no more statements: a statement per batch grew the worker's memory
    by 230 MB over 1,000,000 events before the memory benchmark caught it."""
    _, engine = pg_store
    stream = generate(StreamSpec(events=600, members=50, seed=5))
    ingest_in_batches(engine, stream[:300], [100])
    built = statement.cache_info().currsize
    ingest_in_batches(engine, stream[300:], [100])
    assert statement.cache_info().currsize == built
