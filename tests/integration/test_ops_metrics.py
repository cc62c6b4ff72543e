"""``accumsync metrics`` over HTTP, and the worker's JSON log lines, after a run with VBA faults.

The metrics process is separate from the worker, as in production: every figure it serves must
come from the store or the broker. The worker logs JSON; failures carry VBA's activityId and no
line carries member data.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.stack import ACCUMSYNC, Stack
from worker.demo.procs import Child, wait_for
from worker.demo.sandboxes import SandboxHandle, free_port, running_sandbox
from worker.demo.streams import StreamSpec, generate

pytestmark = pytest.mark.integration


def metrics_argv(port: int) -> list[str]:
    """The metrics command compose runs (its port and address aside)."""
    return [ACCUMSYNC, "metrics", "--port", str(port), "--host", "127.0.0.1"]


@pytest.fixture
def sandbox() -> Iterator[SandboxHandle]:
    """A sandbox answering some 207 items 500."""
    with running_sandbox(retry_after=0.2, item_error_rate=0.1, seed=9) as handle:
        yield handle


def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample as (name, sorted labels) -> value."""
    text = httpx.get(url, timeout=10).text
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_metrics_and_json_logs_after_a_faulty_run(
    make_stack: Callable[..., Stack],
    redis_url: str,
    pg_url: str,
    sandbox: SandboxHandle,
    tmp_path: Path,
) -> None:
    """Counts match the run: events, 207 items, 429s, token refreshes, queue; logs are JSON."""
    stack = make_stack(
        database_url=pg_url,
        broker_url=redis_url,
        backoff_base="0.1",
        backoff_max="0.5",
        max_attempts="200",
        log_format="json",
    )
    stack.use_sandbox(sandbox.env())
    stack.migrate()
    worker = stack.worker("w1", concurrency=2)
    events = generate(StreamSpec(events=300, members=8, invalid=6, seed=51))
    path = tmp_path / "events.jsonl"
    half = len(events) // 2
    path.write_text("".join(json.dumps(e) + "\n" for e in events[:half]))
    stack.cli("publish", str(path))
    stack.cli("flush", "--wait", "--timeout", "120")
    sandbox.admin.set_faults(rate_429=1.0, expire_tokens=True)  # a 429 storm, then a 401
    path.write_text("".join(json.dumps(e) + "\n" for e in events[half:]))
    stack.cli("publish", str(path))
    stack.cli("flush")
    assert wait_for(lambda: "429" in sandbox.admin.counters()["by_status"], 30, 0.2)
    sandbox.admin.set_faults(rate_429=0.0)
    stack.cli("flush", "--wait", "--timeout", "120")

    port = free_port()
    metrics = Child("metrics", metrics_argv(port), stack.env, tmp_path / "metrics.log").start()
    stack.children.append(metrics)
    url = f"http://127.0.0.1:{port}/metrics"
    assert wait_for(lambda: _answers(url), 30, 0.2), metrics.output()
    m = scrape(url)
    status = stack.status()

    def one(name: str, **labels: str) -> float:
        return m[(name, tuple(sorted(labels.items())))]

    assert one("accumsync_events_total", outcome="received") == len(events)
    assert one("accumsync_events_total", outcome="applied") == status["applied"]
    assert one("accumsync_events_total", outcome="duplicate") == status["duplicate"]
    assert one("accumsync_events_total", outcome="invalid") == 6
    assert one("accumsync_dead_letters", source="ingest") == 6
    assert one("accumsync_waiting_accumulators") == 0
    assert one("accumsync_oldest_dirty_age_seconds") == 0
    assert one("accumsync_vba_batch_items_total", status="201") > 0
    assert one("accumsync_vba_batch_items_total", status="500") > 0
    calls = sum(v for (n, _), v in m.items() if n == "accumsync_vba_batch_calls_total")
    assert calls >= 8
    assert one("accumsync_vba_429_total") > 0
    assert one("accumsync_vba_token_refreshes_total") >= 1
    assert one("accumsync_queue_length", queue=stack.queue) == 0
    assert one("accumsync_store_up") == one("accumsync_broker_up") == 1
    counts = sandbox.admin.counters()["by_status"]
    assert one("accumsync_vba_429_total") == int(counts["429"])

    lines = worker.output().splitlines()
    records = [json.loads(line) for line in lines if line.startswith("{")]
    assert not [line for line in lines if re.match(r"\[\d{4}-", line)]  # no Celery text lines
    events_logged = {r["event"] for r in records}
    assert {"ingest.batch", "flush.sent", "flush.item_retry"} <= events_logged
    assert any(" ready." in e for e in events_logged)  # Celery's own lines, as JSON
    # A task's lines carry its Celery id and name: each flush.sent joins the task Flower shows
    # (Celery's own "Task accumsync.flush_pair[<id>] succeeded" line names the same id).
    sent = [r for r in records if r["event"] == "flush.sent"]
    assert sent and {r["task"] for r in sent} == {"accumsync.flush_pair"}
    celery_ids = set(re.findall(r"accumsync\.flush_pair\[([0-9a-f-]{36})\]", worker.output()))
    assert {r["task_id"] for r in sent} <= celery_ids
    assert all(r["task"] == "accumsync.ingest" for r in records if r["event"] == "ingest.batch")
    # Every answer VBA wrapped in its envelope is logged with its activityId (a bare 429 from
    # the rate limiter has none: its line carries the status instead).
    partial = [r for r in records if r["event"] == "vba.batch" and r["failed"]]
    assert partial and all(r["activity_id"] for r in partial)
    assert [r for r in records if r.get("status") == 429]
    member = {str(e[k]) for e in events for k in ("subscriber_id", "group_id")}
    logged = set(re.findall(r"\w+", worker.output()))
    assert member & logged == set()


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.TransportError:
        return False
