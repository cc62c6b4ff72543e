"""The embedded (SQLite) broker delivers again what a killed worker held, and keeps no finished
message: worker/sqlbroker.py on a real worker, a real SIGKILL, the real broker file."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.stack import Stack, same_totals
from worker.demo.procs import wait_for
from worker.demo.streams import StreamSpec, expected_totals, generate

pytestmark = pytest.mark.integration


def broker_rows(stack: Stack) -> list[tuple[int, int]]:
    """(visible, count) of the messages left in the stack's broker file."""
    path = Path(stack.env["ACCUMSYNC_HOME"]) / "broker.db"
    with sqlite3.connect(path) as db:
        return db.execute("SELECT visible, count(*) FROM kombu_message GROUP BY visible").fetchall()


def test_a_batch_held_by_a_killed_worker_is_delivered_again(
    make_stack: Callable[..., Stack],
) -> None:
    """SIGKILL of the worker mid-batch (its transaction open): the batch comes back after the
    visibility timeout and is applied; an acknowledged message leaves the broker file."""
    events = generate(StreamSpec(events=200, members=10, seed=31))
    stack = make_stack(broker_visibility_timeout="2")
    stack.migrate()
    held = stack.worker("held", ACCUMSYNC_FAILPOINT="ingest.before_commit:sleep=30")
    stack.cli(
        "publish", "-", "--batch-size", "500", stdin="".join(json.dumps(e) + "\n" for e in events)
    )
    assert wait_for(lambda: "failpoint.sleep" in held.output(), 60), held.output()[-3000:]
    held.kill()  # the whole process group: the message it took dies with it, unacknowledged
    stack.worker("w1")
    received = lambda: stack.items_received() >= len(events)  # noqa: E731
    assert wait_for(received, 60, 0.5), f"{stack.items_received()} of {len(events)} received"
    assert same_totals(stack.totals(), expected_totals(events)) == []
    assert "broker.redelivered messages=1" in stack.logs()
    assert wait_for(lambda: broker_rows(stack) == [], 10), broker_rows(stack)
