"""Delivery faults: every event three times in shuffled order; poison among valid neighbours."""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path
from typing import Any

import pytest
from redis import Redis

from tests.chaos.conftest import Chaos, EventCapture, distinctive
from worker.demo.streams import StreamSpec, generate

pytestmark = pytest.mark.chaos


def test_every_event_three_times_shuffled(chaos: Chaos, tmp_path: Path) -> None:
    """Three deliveries of every event, shuffled, over two workers: each counted once, exactly."""
    chaos.vba()
    stack = chaos.stack()
    events = distinctive(generate(StreamSpec(events=1_500, members=60, seed=71)))
    unique = len({e["event_id"] for e in events})
    delivered = events * 3
    random.Random(71).shuffle(delivered)
    monitor = EventCapture(stack.env["ACCUMSYNC_BROKER_URL"], stack.queue).start()
    path = tmp_path / "triple.jsonl"
    path.write_text("".join(json.dumps(e) + "\n" for e in delivered))
    stack.cli("publish", str(path), "--batch-size", "150")
    queued = broker_headers(stack.env["ACCUMSYNC_BROKER_URL"], stack.queue)
    assert len(queued) == len(delivered) // 150  # nothing consumed yet: every message is there
    stack.worker("w1", concurrency=2)
    stack.worker("w2", concurrency=1)
    stack.beat()
    chaos.drain(stack, unique)
    stack.cli("status")
    figures = stack.figures()
    assert figures["received"] == len(delivered)
    assert figures["duplicate"] >= 2 * unique
    chaos.finish(
        stack,
        events,
        fault="every event delivered 3 times, shuffled",
        injected="stream x3, shuffled, 30 messages over 2 workers (3 processes)",
        times=3,
        events_in=len(delivered),
        monitor=monitor.stop() + "\n" + "\n".join(queued),
        extra={"celery_task_events_scanned": monitor.task_events(), "broker_messages": len(queued)},
    )


def broker_headers(url: str, queue: str) -> list[str]:
    """What a broker monitor shows of each queued message: its headers (argsrepr), not body."""
    raw = Redis.from_url(url).lrange(queue, 0, -1)
    return [json.dumps(json.loads(m)["headers"]) for m in raw]


def poison(valid: list[dict[str, Any]]) -> list[tuple[Any, str]]:
    """(item, expected reason fragment) for each kind of poison the issue names."""
    base = valid[0]
    huge = "x" * (10 * 1024 * 1024)
    return [
        ("{not json", "invalid JSON"),
        (dict(base, event_id="p-types", version="two"), "version"),
        (dict(base, event_id="p-long", claim_id="c" * 5000), "claim_id: must be at most 64"),
        (dict(base, event_id="p-neg", amounts={"copay": "-5.00"}), "amounts.copay: must be >= 0"),
        (dict(base, event_id="p-3dp", amounts={"copay": "1.005"}), "at most 2 decimals"),
        (dict(base, event_id="p-unknown", copay_typo="5.00"), "unknown field"),
        (dict(base, event_id="p-huge", notes=huge), "oversized"),
        # the first event's id again, with other content
        (dict(base, amounts={"copay": "99.99"}), "already received with different content"),
        (42, "must be a JSON object"),
    ]


def test_poison_is_dead_lettered_and_neighbours_applied(chaos: Chaos, tmp_path: Path) -> None:
    """Each poison item is dead-lettered with its reason; the worker goes on; the rest lands."""
    chaos.vba()
    stack = chaos.stack()
    events = distinctive(generate(StreamSpec(events=600, members=30, duplicate_rate=0, seed=72)))
    first, second = events[:300], events[300:]
    bad = poison(first)
    mixed: list[Any] = []
    for i, event in enumerate(first):
        mixed.append(event)
        if i % 30 == 29 and bad:
            mixed.append(bad.pop(0)[0])
    worker = stack.worker("w1", concurrency=1)
    stack.beat()
    stack.send(mixed, batch=50)  # poison spread over the messages, valid events beside it
    stack.send_raw({"event_id": "lonely"})  # one bare object where a list belongs
    chaos.drain(stack, len(first))
    stack.send(second, batch=50)  # the same worker keeps consuming after all that
    chaos.drain(stack, len(events))
    assert worker.alive()
    letters = dead_letters(stack)
    for item, reason in poison(first):
        found = [r for p, r in letters if matches(p, item)]
        assert found and reason in found[0], (reason, found, [r for _, r in letters])
    lonely = [r for p, r in letters if "lonely" in p]
    assert len(lonely) == 1 and "claim_id: required" in lonely[0]  # one item, not one per key
    huge = [p for p, _ in letters if "p-huge" in p]
    assert huge and len(huge[0]) < 20_000 and "sha256" in huge[0]  # truncated, size and hash
    stack.cli("dead-letters", "list")
    chaos.finish(
        stack,
        events,
        fault="poison input",
        injected="9 kinds of poison (incl. a 10 MB event) among 600 valid events, 1 worker",
        times=len(poison(first)) + 1,
        events_in=len(mixed) + 1 + len(second),
        extra={"dead_letter_reasons": sorted({r.split(":")[0] for _, r in letters})},
    )


def dead_letters(stack: Any) -> list[tuple[str, str]]:
    """(payload, reason) of every ingest dead letter."""
    from sqlalchemy import text

    with stack.engine.connect() as conn:
        rows = conn.execute(text("SELECT payload, reason FROM dead_letter WHERE source='ingest'"))
        return [(str(p), str(r)) for p, r in rows]


def matches(payload: str, item: Any) -> bool:
    """Whether a stored (possibly truncated) payload is this poison item."""
    if isinstance(item, dict):
        eid = item.get("event_id")
        if "notes" in item:
            return str(eid) in payload and "sha256" in payload
        try:
            stored = json.loads(payload)
        except ValueError:
            return False
        return stored == json.loads(json.dumps(item))
    return payload in (item if isinstance(item, str) else json.dumps(item), str(item))


def sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()
