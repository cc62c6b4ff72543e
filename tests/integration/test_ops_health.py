"""``accumsync health`` judges progress: red while VBA is unreachable, green once it drains.

Real worker and beat on Redis + Postgres, the sandbox over HTTP stopped and started again.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from tests.stack import Stack
from worker.demo.procs import wait_for
from worker.demo.sandboxes import SandboxHandle, running_sandbox
from worker.demo.streams import StreamSpec, generate

pytestmark = pytest.mark.integration

HEALTH = ("health", "--json", "--samples", "1")
"""The health command as compose's worker healthcheck runs it (plus --json to read it)."""


@pytest.fixture
def sandbox(tmp_path: Path) -> Iterator[SandboxHandle]:
    """A sandbox keeping its rows in a file, so it can be stopped and started again."""
    with running_sandbox(state=str(tmp_path / "vba.db")) as handle:
        yield handle


def health(stack: Stack) -> tuple[int, dict[str, Any]]:
    proc = stack.cli(*HEALTH, check=False)
    return proc.returncode, json.loads(proc.stdout)


def test_health_red_while_vba_down_green_after(
    make_stack: Callable[..., Stack],
    redis_url: str,
    pg_url: str,
    sandbox: SandboxHandle,
    tmp_path: Path,
) -> None:
    """Flushing stalls with the sandbox down: health exits 1 naming why; back up, it exits 0."""
    stack = make_stack(
        database_url=pg_url,
        broker_url=redis_url,
        flush_interval="1",
        flush_lease="5",
        vba_timeout="2",
        backoff_base="0.2",
        backoff_max="1",
        max_attempts="500",
        health_max_dirty_age="4",
        health_max_flush_age="4",
    )
    stack.use_sandbox(sandbox.env())
    stack.migrate()
    stack.worker("w1", concurrency=2)
    stack.beat()
    events = generate(StreamSpec(events=600, members=20, seed=41))
    stack.publish(events[:300])
    stack.cli("flush", "--wait", "--timeout", "60")
    code, report = health(stack)
    assert (code, report["healthy"]) == (0, True), report

    sandbox.stop()
    stack.publish(events[300:400])
    assert wait_for(lambda: health(stack)[0] == 1, 30, 1)
    code, report = health(stack)
    failed = {c["name"]: c for c in report["checks"] if not c["ok"]}
    assert {"oldest_dirty", "last_flush"} <= set(failed), report
    assert "accumulators wait for a flush" in failed["oldest_dirty"]["reason"]
    assert stack.cli("health", "--samples", "1", check=False).stdout.count("FAIL") == 2

    sandbox.start()
    assert wait_for(lambda: health(stack)[0] == 0, 60, 1), health(stack)
    assert health(stack)[1]["info"]["waiting"] == 0


def test_health_red_while_the_queue_grows(
    make_stack: Callable[..., Stack], redis_url: str, tmp_path: Path
) -> None:
    """No worker consumes and messages keep arriving: the backlog check fails."""
    stack = make_stack(broker_url=redis_url)
    stack.migrate()
    client = redis.Redis.from_url(redis_url)
    stop = threading.Event()

    def produce() -> None:  # a producer outpacing absent workers
        while not stop.wait(0.1):
            client.lpush(stack.queue, b"{}")

    thread = threading.Thread(target=produce)
    thread.start()
    try:
        proc = stack.cli("health", "--json", "--samples", "3", "--interval", "0.5", check=False)
    finally:
        stop.set()
        thread.join()
        client.delete(stack.queue)
        client.close()
    report = json.loads(proc.stdout)
    backlog = next(c for c in report["checks"] if c["name"] == "backlog")
    assert proc.returncode == 1 and not backlog["ok"], report
    assert backlog["reason"].endswith("(growing)")
    quiet = json.loads(stack.cli("health", "--json", "--samples", "2", "--interval", "0").stdout)
    assert quiet["healthy"], quiet


def test_health_red_while_nobody_consumes(
    make_stack: Callable[..., Stack], redis_url: str, pg_url: str, tmp_path: Path
) -> None:
    """Messages wait with no task progress (a stalled consumer): red, however flat the backlog;
    green again once a worker consumes them."""
    stack = make_stack(broker_url=redis_url, database_url=pg_url, health_max_idle="1")
    stack.migrate()
    events = generate(StreamSpec(events=200, members=10, seed=41))
    path = tmp_path / "e.jsonl"
    path.write_text("".join(json.dumps(e) + "\n" for e in events))
    stack.cli("publish", str(path), "--batch-size", "50")
    time.sleep(1.5)
    proc = stack.cli("health", "--json", "--samples", "2", "--interval", "0.2", check=False)
    report = json.loads(proc.stdout)
    consuming = next(c for c in report["checks"] if c["name"] == "consuming")
    assert proc.returncode == 1 and not consuming["ok"], report
    assert (
        consuming["reason"]
        == "4 messages wait; last task progress never (workers are not consuming)"
    )
    stack.worker("w1")
    assert wait_for(lambda: stack.items_received() == 200, 60)
    report = json.loads(stack.cli("health", "--json", "--samples", "2", "--interval", "0").stdout)
    assert next(c for c in report["checks"] if c["name"] == "consuming")["ok"], report
