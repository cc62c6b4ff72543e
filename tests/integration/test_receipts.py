"""Receipts end to end: ``accumsync receipts`` says which events the ledger has not recorded, and
``publish --confirm`` publishes again what a broker lost, on Redis and Postgres with a real
worker."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import redis

from tests.stack import ACCUMSYNC, Stack
from worker.demo.procs import Child, wait_for
from worker.demo.streams import StreamSpec, generate
from worker.ingest.receipts import event_ids

pytestmark = pytest.mark.integration


def jsonl(path: Path, events: list[Any]) -> Path:
    path.write_text("".join(json.dumps(e) + "\n" for e in events))
    return path


def test_publish_confirm_publishes_again_what_the_broker_lost(
    make_stack: Callable[..., Stack], redis_url: str, pg_url: str, tmp_path: Path
) -> None:
    """Two of six messages vanish from the queue before any worker runs: ``--confirm`` waits,
    finds their 100 events missing, publishes those again, and ends with every event recorded."""
    stack = make_stack(database_url=pg_url, broker_url=redis_url)
    stack.migrate()
    events = generate(StreamSpec(events=300, members=10, duplicate_rate=0, seed=41))
    path = jsonl(tmp_path / "events.jsonl", events)
    ids, _ = event_ids(events)

    before = stack.cli("receipts", str(path), "--json", check=False)
    assert before.returncode == 1
    assert json.loads(before.stdout)["counts"] == {
        "recorded": 0,
        "refused": 0,
        "missing": len(ids),
        "unidentified": 0,
    }

    argv = [ACCUMSYNC, "publish", str(path), "--confirm", "--within", "8", "--batch-size", "50"]
    confirm = Child("confirm", argv, stack.env, tmp_path / "confirm.log").start()
    stack.children.append(confirm)
    broker = redis.Redis.from_url(redis_url)
    assert wait_for(lambda: broker.llen(stack.queue) == 6, 60, 0.05), confirm.output()
    for _ in range(2):  # the two oldest messages: lost by the broker, as far as anyone knows
        broker.rpop(stack.queue)
    broker.close()
    stack.worker("w1")
    assert wait_for(lambda: not confirm.alive(), 120, 0.2), confirm.output()
    output = confirm.output()
    assert confirm.proc is not None and confirm.proc.returncode == 0, output
    assert "round 2: published again 100 events" in output
    assert f"{len(ids)} events: {len(ids)} recorded, 0 refused, 0 missing" in output

    after = stack.cli("receipts", str(path), "--json")
    assert json.loads(after.stdout)["counts"]["recorded"] == len(ids)
    assert stack.status()["received"] == len(ids)  # each event once, whatever was sent twice


def test_receipts_name_the_missing_and_the_refused(
    make_stack: Callable[..., Stack], redis_url: str, pg_url: str, tmp_path: Path
) -> None:
    """Published events are recorded, invalid ones refused (dead letters), never-published ones
    missing, a line without an event id unidentified; exit 1 while any is not recorded."""
    stack = make_stack(database_url=pg_url, broker_url=redis_url)
    stack.migrate()
    stack.worker("w1")
    events = generate(StreamSpec(events=120, members=6, invalid=4, duplicate_rate=0, seed=42))
    bad = [e for e in events if e["event_id"].startswith("bad-")]
    good = [e for e in events if not e["event_id"].startswith("bad-")]
    stack.publish(good[:-20])
    stack.publish(bad, wait=False)
    path = jsonl(tmp_path / "all.jsonl", [*events, {"no": "id"}])

    def found() -> dict[str, Any]:
        proc = stack.cli("receipts", str(path), "--json", check=False)
        assert proc.returncode == 1, proc.stdout + proc.stderr
        answer: dict[str, Any] = json.loads(proc.stdout)
        return answer

    assert wait_for(lambda: found()["counts"]["refused"] == len(bad), 60, 0.5), found()
    answer = found()
    in_order = [e["event_id"] for e in events]
    assert answer["recorded"] == [i for i in in_order if i in {e["event_id"] for e in good[:-20]}]
    assert answer["refused"] == [i for i in in_order if i.startswith("bad-")]
    assert answer["missing"] == [i for i in in_order if i in {e["event_id"] for e in good[-20:]}]
    assert answer["unidentified"] == [len(events) + 1]

    text = stack.cli("receipts", str(path), check=False).stdout
    assert text.startswith(f"{len(events)} events: 96 recorded, 4 refused, 20 missing; 1 line")
    assert "missing (not recorded: publish them again, an event counts once):" in text
    assert all(f"  {e['event_id']}\n" in text for e in good[-20:])
    stdin = "".join(json.dumps(e) + "\n" for e in good[:5])
    assert stack.cli("receipts", "-", stdin=stdin).stdout.startswith("5 events: 5 recorded")
