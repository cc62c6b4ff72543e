"""The fold's cost grows with the versions it takes, never with their square.

A backlog (a backfill, a worker that was down) is folded in one fold of up to ``MAX_BATCHES``
batches. The fold's transaction turns hash and merge joins off (``BY_INDEX``), so every join is
a nested loop, and a nested loop is only as cheap as its inner side: an index lookup per outer
row costs a few microseconds, a rescan of a common table expression costs its whole length. The
accumulators' insert once joined the ``RETURNING`` of the new pairs' insert that way: a fold of
19,000 versions with 10,860 new pairs spent 17 of its 17.5 s rescanning it.

So on Postgres the inner side of every nested loop the fold plans reads a table by an index,
never a common table expression; the planner's choice is read off ``EXPLAIN`` of the fold's own
statements over a backlog of new keys, as a worker runs them.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from sqlalchemy import Engine, insert, text, update
from sqlmodel import Session

from worker.db import make_engine, utcnow
from worker.demo.streams import StreamSpec, generate
from worker.ingest.store import ingest
from worker.store.fold import BY_INDEX, oldest_batches, statements
from worker.store.tables import T_BATCH

pytestmark = pytest.mark.integration


def rescans(node: dict[str, Any], inner: bool = False) -> list[str]:
    """The common table expressions a plan reads once per row of a nested loop's outer side:
    those under the inner side of a ``Nested Loop`` (a ``Materialize`` in between keeps the
    rows, and still hands all of them to every outer row)."""
    found = [node["CTE Name"]] if inner and node["Node Type"] == "CTE Scan" else []
    for child in node.get("Plans", []):
        below_inner = node["Node Type"] == "Nested Loop" and child["Parent Relationship"] == "Inner"
        found += rescans(child, inner or below_inner)
    return found


def test_a_backlog_fold_rescans_no_common_table_expression_per_row(pg_engine: Engine) -> None:
    """Ten batches of new members, recorded and not folded: each of the fold's statements
    joins by index. On the fold that took the new pairs' ids from their insert's ``RETURNING``
    this names ``new_pairs``."""
    events = generate(StreamSpec(events=2_000, members=1_500, seed=3))
    for start in range(0, len(events), 200):
        with Session(pg_engine) as session:
            ingest(session, events[start : start + 200])
            session.commit()
    with Session(pg_engine) as session:
        session.execute(BY_INDEX)
        batches = list(session.execute(oldest_batches()).scalars())
        params = {"batches": f"{{{','.join(map(str, batches))}}}", "now": utcnow(), "held": False}
        plans = []
        for stmt in statements(True, False):
            explain = text(f"EXPLAIN (FORMAT JSON) {stmt.text}")
            (plan,) = session.execute(explain, params).scalar_one()
            plans.append(plan if isinstance(plan, dict) else json.loads(plan))
        session.rollback()
    assert len(batches) == 10
    rescanned = [rescans(plan["Plan"]) for plan in plans]
    assert rescanned == [[] for _ in plans], f"a nested loop rescans {rescanned}"


def test_a_fold_takes_whole_batches_up_to_its_events(store_url: str) -> None:
    """A fold's batches are bounded in events as well as in number, so a backlog of messages
    of any size folds in transactions of bounded length; a batch larger than the bound alone
    is still taken, alone. (Counted in batches only, 200 messages of 2,000 made one fold of
    400,000 versions.)"""
    engine = make_engine(store_url)
    try:
        with Session(engine) as session:
            received = [40_000, 50_000, 9_999, 2, 300_000, 1, 1]
            ids = [
                session.execute(
                    insert(T_BATCH).values(at=utcnow(), received=n).returning(T_BATCH.c.id)
                ).scalar_one()
                for n in received
            ]
            session.commit()

            def taken(**bound: int) -> list[int]:
                return list(session.execute(oldest_batches(**bound)).scalars())

            assert taken() == ids[:4]  # 99,999 events before the fourth; 100,001 before the fifth
            assert taken(limit=2) == ids[:2]
            assert taken(events=40_000) == ids[:1]
            session.execute(
                update(T_BATCH).where(T_BATCH.c.id.in_(ids[:4])).values(folded_at=utcnow())
            )
            assert taken() == ids[4:5]  # the large one alone: 300,000 events before the next
            session.execute(
                update(T_BATCH).where(T_BATCH.c.id == ids[4]).values(folded_at=utcnow())
            )
            assert taken(events=1) == ids[5:6]
    finally:
        engine.dispose()
