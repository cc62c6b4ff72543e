"""Ingest end to end: `accumsync publish` -> a real Celery worker -> the store, to the cent."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.stack import Stack, same_totals
from worker.procs import wait_for
from worker.streams import StreamSpec, expected_totals, generate

pytestmark = pytest.mark.integration


def write_jsonl(path: Path, events: list[Any]) -> Path:
    path.write_text("".join(json.dumps(e) + "\n" for e in events))
    return path


def valid(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in events if not str(e["event_id"]).startswith("bad-")]


def drained(stack: Stack, n: int, timeout: float = 120) -> dict[str, Any]:
    """Wait until the store has received ``n`` events; returns the final status."""
    assert wait_for(lambda: stack.status()["events_received"] >= n, timeout, 0.5), stack.logs()[
        -4000:
    ]
    return stack.status()


def test_publish_to_worker_on_redis_and_postgres(
    make_stack: Callable[..., Stack], redis_url: str, pg_url: str, tmp_path: Path
) -> None:
    """Events published through Redis to a worker land in Postgres with exact totals."""
    events = generate(StreamSpec(events=3_000, members=200, seed=11))
    stack = make_stack(database_url=pg_url, broker_url=redis_url)
    stack.cli("db", "upgrade")
    stack.worker("w1", concurrency=2)
    out = stack.cli(
        "publish", str(write_jsonl(tmp_path / "events.jsonl", events)), "--batch-size", "250"
    )
    assert "published 3000 events" in out.stdout
    status = drained(stack, len(events))
    assert status["invalid"] == status["conflicts"] == status["dead_letters"] == 0
    assert status["events_applied"] + status["duplicates"] + status["stale"] == len(events)
    assert same_totals(stack.totals(), expected_totals(events)) == []


def test_publish_on_embedded_defaults(make_stack: Callable[..., Stack], tmp_path: Path) -> None:
    """With no server configured (SQLite store and broker) the same stream gives the same totals."""
    events = generate(StreamSpec(events=1_500, members=100, seed=12))
    stack = make_stack()
    stack.cli("db", "upgrade")
    stack.worker("w1")
    stack.cli("publish", "-", stdin="".join(json.dumps(e) + "\n" for e in events))
    drained(stack, len(events))
    assert same_totals(stack.totals(), expected_totals(events)) == []
    assert (tmp_path / "stack0" / "home" / "broker.db").exists()


def test_two_workers_on_the_same_claims_lose_nothing(
    make_stack: Callable[..., Stack], redis_url: str, pg_url: str, tmp_path: Path
) -> None:
    """Two worker processes (and a -c 2 pool) ingesting interleaved batches of the same claims
    end with exact totals, and no deadlock or serialization error is left unhandled."""
    events = generate(StreamSpec(events=4_000, members=40, replace_rate=0.4, seed=13))
    # Every event three times, so batches on different workers overlap on the same claims.
    stream = events + events[::-1] + events[len(events) // 2 :] + events[: len(events) // 2]
    stack = make_stack(database_url=pg_url, broker_url=redis_url)
    stack.cli("db", "upgrade")
    stack.worker("w1", concurrency=2)
    stack.worker("w2", concurrency=1)
    stack.cli("publish", str(write_jsonl(tmp_path / "e.jsonl", stream)), "--batch-size", "100")
    status = drained(stack, len(stream), timeout=180)
    assert status["events_applied"] + status["duplicates"] + status["stale"] == len(stream)
    assert same_totals(stack.totals(), expected_totals(events)) == []
    logs = stack.logs()
    assert "succeeded" in logs
    assert " raised " not in logs and "ERROR" not in logs, logs[-4000:]


def test_three_invalid_among_a_thousand(
    make_stack: Callable[..., Stack], redis_url: str, pg_url: str, tmp_path: Path
) -> None:
    """A batch of 1,000 with 3 invalid events: 997 applied, 3 dead letters naming field and rule."""
    events = generate(
        StreamSpec(events=1_000, duplicate_rate=0, replace_rate=0, invalid=3, seed=14)
    )
    stack = make_stack(database_url=pg_url, broker_url=redis_url)
    stack.cli("db", "upgrade")
    stack.worker("w1")
    stack.cli("publish", str(write_jsonl(tmp_path / "e.jsonl", events)), "--batch-size", "1000")
    status = drained(stack, 1_000)
    assert (status["events_applied"], status["invalid"], status["dead_letters"]) == (997, 3, 3)
    reasons = {d["reason"] for d in json.loads(stack.cli("dead-letters", "list", "--json").stdout)}
    assert reasons == {
        "amounts.copay: at most 2 decimals",
        "amounts.deductible: must be >= 0",
        "subscriber_id: must be at most 9 characters",
    }
    assert same_totals(stack.totals(), expected_totals(valid(events))) == []


def test_worker_refuses_an_unmigrated_database(
    make_stack: Callable[..., Stack], redis_url: str, pg_url: str
) -> None:
    """A worker on an unmigrated store exits at once and names the command to run."""
    stack = make_stack(database_url=pg_url, broker_url=redis_url)
    with pytest.raises(Exception, match="accumsync db upgrade"):
        stack.worker("w1")
