"""Ingest end to end: `accumsync publish` -> a real Celery worker -> the store, to the cent."""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import redis
from kombu import compression
from sqlalchemy import text

from tests.stack import Stack, plant_full_total, same_totals
from worker.db import make_engine
from worker.demo.procs import wait_for
from worker.demo.streams import StreamSpec, expected_totals, generate
from worker.ingest import wire

pytestmark = pytest.mark.integration


def write_jsonl(path: Path, events: list[Any]) -> Path:
    path.write_text("".join(json.dumps(e) + "\n" for e in events))
    return path


def valid(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in events if not str(e["event_id"]).startswith("bad-")]


def drained(stack: Stack, n: int, timeout: float = 120) -> dict[str, Any]:
    """Wait until the store has received ``n`` events; returns the final status."""
    assert wait_for(lambda: stack.items_received() >= n, timeout, 0.5), stack.logs()[-4000:]
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
    assert status["invalid"] == status["conflict"] == status["dead_letters"] == 0
    assert status["applied"] + status["duplicate"] + status["stale"] == len(events)
    assert same_totals(stack.totals(), expected_totals(events)) == []


def test_a_batch_travels_compressed(
    make_stack: Callable[..., Stack], redis_url: str, pg_url: str, tmp_path: Path
) -> None:
    """``publish`` compresses a message's body (zstd, named in its headers as kombu's codecs
    are): 2,000 events wait in Redis in a tenth of their JSON's bytes, and decompress to the
    same events. The worker takes such a message as any other (the test above)."""
    events = generate(StreamSpec(events=2_000, members=200, seed=12))
    stack = make_stack(database_url=pg_url, broker_url=redis_url)
    stack.cli("publish", str(write_jsonl(tmp_path / "events.jsonl", events)))  # no worker
    queued = redis.Redis.from_url(redis_url).lrange(stack.queue, 0, -1)
    (message,) = [json.loads(raw) for raw in queued]
    assert message["headers"]["compression"] == "application/zstd"
    packed = base64.b64decode(message["body"])
    (batch,), kwargs, _ = json.loads(compression.decompress(packed, "application/zstd"))
    assert (wire.decode(batch), kwargs) == (events, {})
    assert len(packed) * 5 < len(batch), (len(packed), len(batch))


def test_a_worker_stopped_folds_what_it_recorded_before_it_exits(
    make_stack: Callable[..., Stack], redis_url: str, pg_url: str
) -> None:
    """A pool process folds the batches it recorded after ``ACCUMSYNC_FOLD_DELAY``, a minute
    here, so the batch is recorded and waits for its fold; the worker is stopped (SIGTERM, a
    warm shutdown) and its process folds it before it exits: a stopped worker leaves no batch
    of its own waiting. Without the fold at exit the batch was still waiting:
    ``assert (1, 1) == (1, 0)``.

    The batch is watched every millisecond, so the worker is often stopped while its task is
    still running after its commit. When the stop sent SIGTERM to the worker's whole process
    group (as systemd's default ``KillMode=control-group`` does), the pool process died there
    (``WorkerLostError``): 7 runs of 8 failed, 5 with the batch still waiting
    (``assert (1, 1) == (1, 0)``), 2 on the lost pool process."""
    events = generate(StreamSpec(events=300, members=50, seed=21))
    stack = make_stack(database_url=pg_url, broker_url=redis_url, fold_delay="60")
    stack.cli("db", "upgrade")
    worker = stack.worker("w1", concurrency=1)
    stack.publish(events, wait=False)
    batches = "SELECT count(*), count(*) FILTER (WHERE folded_at IS NULL) FROM ingest_batch"
    with stack.store() as conn:
        recorded = lambda: tuple(conn.execute(text(batches)).one())  # noqa: E731
        assert wait_for(lambda: recorded()[0] >= 1, 60, 0.001), stack.logs()[-4000:]
        assert recorded() == (1, 1)  # one message, recorded, its fold held for a minute
        worker.stop()
        assert recorded() == (1, 0), worker.output()[-12000:]
        assert "WorkerLostError" not in worker.output(), worker.output()[-4000:]
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
    assert status["applied"] + status["duplicate"] + status["stale"] == len(stream)
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
    assert (status["applied"], status["invalid"], status["dead_letters"]) == (997, 3, 3)
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


def test_an_event_the_store_refuses_is_dead_lettered_and_the_rest_land(
    make_stack: Callable[..., Stack], redis_url: str, pg_url: str, tmp_path: Path
) -> None:
    """Validation cannot see everything: an event that would push its accumulator past BIGINT
    passes every ClaimEvent rule, and Postgres refuses the statement (and so the whole batch).
    The task bisects the batch down to that event, dead-letters it with the store's reason and
    applies the other 199; before, the message was retried forever as "database unavailable"."""
    events = generate(StreamSpec(events=200, duplicate_rate=0, replace_rate=0, seed=15))
    first = events[0]
    key = {k: first[k] for k in ("subscriber_id", "group_id", "plan_year", "plan_type")}
    rest = [e for e in events[1:] if {k: e[k] for k in key} != key]
    stack = make_stack(database_url=pg_url, broker_url=redis_url)
    stack.cli("db", "upgrade")
    engine = make_engine(pg_url)
    with engine.begin() as conn:  # the pair and accumulator the first event lands in, full
        plant_full_total(conn, first, "allowed_total")
    engine.dispose()
    batch = [first, *rest]
    stack.worker("w1")
    stack.cli("publish", str(write_jsonl(tmp_path / "e.jsonl", batch)), "--batch-size", "500")
    status = drained(stack, len(batch))
    assert (status["applied"], status["invalid"], status["dead_letters"]) == (
        len(rest),
        1,
        1,
    )
    (letter,) = json.loads(stack.cli("dead-letters", "list", "--json").stdout)
    assert letter["reason"] == (
        "event: the store refused it (NumericValueOutOfRange: bigint out of range)"
    )
    assert letter["event_id"] == first["event_id"]
    assert (
        same_totals(
            {k: v for k, v in stack.totals().items() if k[:4] != tuple(key.values())},
            expected_totals(rest),
        )
        == []
    )
