"""The ledger's central property on the Postgres store, whose bulk writes and fold lock are its
own code path.

The same random deliveries as ``tests/unit/test_ledger_properties.py`` (SQLite), cut into random
batches, ingested into a real Postgres database (emptied between examples) and folded after any of
them: the accumulators equal the independent oracle to the cent, whatever the order, duplication,
batching and folding; with conflicts, they equal models.ledger's Fold fed the same stream one
event at a time; and batches ingested by two sessions side by side, folded meanwhile by a third,
count every event once.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from sqlalchemy import Engine, text

from models.ledger import Kind, totals
from tests.services import create_database, drop_database
from tests.stack import Stack, same_totals
from tests.unit.test_events import BASE
from tests.unit.test_ledger_properties import (
    as_vba,
    deliveries,
    ingest_in_batches,
    recorded_and_conflicts,
    sequential_law,
    with_conflicts,
)
from worker.db import make_engine, upgrade
from worker.demo.streams import StreamSpec, expected_totals, generate
from worker.store.bulk import statement
from worker.store.fold import fold_committed, in_session_of

TABLES = "received_event, claim, accumulator, pair, dead_letter, ingest_batch, event_counter"


def emptied(engine: Engine) -> None:
    """The store as new, between two examples."""
    with engine.begin() as conn:
        conn.execute(text(f"TRUNCATE {TABLES} RESTART IDENTITY CASCADE"))


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
@given(
    case=deliveries(),
    cuts=st.lists(st.integers(1, 10), min_size=1, max_size=6),
    folds=st.lists(st.booleans(), min_size=1, max_size=4),
)
def test_postgres_store_equals_the_oracle_across_batches(
    tmp_path_factory: pytest.TempPathFactory,
    pg_store: tuple[str, Engine],
    case: Any,
    cuts: list[int],
    folds: list[bool],
) -> None:
    """Folded after any of the batches (several batches in one fold, or one each)."""
    url, engine = pg_store
    emptied(engine)
    events, delivered = case
    ingest_in_batches(engine, delivered, cuts, folds)
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


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    delivered=with_conflicts(),
    cuts=st.lists(st.integers(1, 10), min_size=1, max_size=6),
    folds=st.lists(st.booleans(), min_size=1, max_size=4),
)
@example(
    # Batch 2 repeats version 0 under a new id, after reusing its id for other content: the new
    # id was recorded in the first round, then found a conflict too (recorded and refused).
    delivered=[
        {**BASE, "event_id": "c0-v0", "version": 0, "amounts": {}},
        {**BASE, "event_id": "c0-v1", "version": 1, "amounts": {}},
        {**BASE, "event_id": "c0-v0", "version": 0, "amounts": {"copay": "7777.77"}},
        {**BASE, "event_id": "c0-v0-again0", "version": 0, "amounts": {"copay": "7777.77"}},
        {**BASE, "event_id": "c0-v2", "version": 2, "amounts": {}},
    ],
    cuts=[2],
    folds=[False],
)
def test_postgres_store_equals_the_sequential_law_with_conflicts(
    tmp_path_factory: pytest.TempPathFactory,
    pg_store: tuple[str, Engine],
    delivered: list[dict[str, Any]],
    cuts: list[int],
    folds: list[bool],
) -> None:
    """Record, then fold, on Postgres: the same events recorded and refused as models.ledger's
    Fold fed one by one, and its claim states' totals, however batches and folds fall."""
    url, engine = pg_store
    emptied(engine)
    ingest_in_batches(engine, delivered, cuts, folds)
    fold, received = sequential_law(delivered)
    assert recorded_and_conflicts(engine) == (received, fold.counts[Kind.CONFLICT])
    stack = Stack(tmp_path_factory.mktemp("law"), database_url=url)
    assert same_totals(stack.totals(), as_vba(totals(fold.current.values()))) == []


@settings(
    max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(case=deliveries(), cuts=st.lists(st.integers(1, 6), min_size=1, max_size=4))
def test_concurrent_batches_and_folds_equal_the_oracle(
    tmp_path_factory: pytest.TempPathFactory,
    pg_store: tuple[str, Engine],
    case: Any,
    cuts: list[int],
) -> None:
    """Two sessions ingest halves of one delivery side by side while a third folds in a loop:
    every duplicate across the halves counts once, every version is folded once."""
    url, engine = pg_store
    emptied(engine)
    events, delivered = case
    halves = [delivered[0::2], delivered[1::2]]
    done = threading.Event()
    errors: list[BaseException] = []

    def ingesting(part: list[dict[str, Any]]) -> None:
        try:
            ingest_in_batches(engine, part, cuts, folds=(False,))
        except BaseException as exc:  # reported by the test, not lost in the thread
            errors.append(exc)

    def folding() -> None:
        try:
            while not done.is_set():
                fold_committed(in_session_of(engine))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=ingesting, args=(h,)) for h in halves]
    folder = threading.Thread(target=folding)
    for t in (*threads, folder):
        t.start()
    for t in threads:
        t.join(timeout=60)
    done.set()
    folder.join(timeout=60)
    assert errors == []
    fold_committed(in_session_of(engine))
    stack = Stack(tmp_path_factory.mktemp("concurrent"), database_url=url)
    assert same_totals(stack.totals(), expected_totals(events)) == []


def test_an_id_recorded_as_a_repeat_that_turns_out_the_version_is_folded(
    pg_store: tuple[str, Engine],
) -> None:
    """A batch holds version 1 twice, under id "a" and then under id "b", with one content. The
    store holds "a" already, for version 0: so "a" is a conflict and "b" is version 1 itself.
    The optimistic first round decided "b" a repeat of "a"'s version and recorded it with no
    batch; the second round, seeing "a" stored, decided "b" the version, and left it unfolded.
    On that code the copay stayed at version 0's 1.00: ``assert [100] == [500]``."""
    _, engine = pg_store
    emptied(engine)
    first = {**BASE, "event_id": "a", "version": 0, "amounts": {"copay": "1.00"}}
    reused = {**BASE, "event_id": "a", "version": 1, "amounts": {"copay": "5.00"}}
    repeat = {**BASE, "event_id": "b", "version": 1, "amounts": {"copay": "5.00"}}
    ingest_in_batches(engine, [first, reused, repeat], [1, 2])
    with engine.connect() as conn:
        copay = conn.execute(text("SELECT copay_total FROM accumulator")).scalars().all()
        unfolded = conn.execute(
            text("SELECT event_id FROM received_event WHERE batch_id IS NULL")
        ).scalars()
        assert list(copay) == [500]
        assert list(unfolded) == []
    fold, received = sequential_law([first, reused, repeat])
    assert recorded_and_conflicts(engine) == (received, fold.counts[Kind.CONFLICT])
