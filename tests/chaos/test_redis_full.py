"""Redis full (``maxmemory``, ``noeviction``): publishing is refused loudly, what was queued
stays queued, and publishing resumes once the workers have drained memory free."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.chaos.conftest import Chaos, ChaosStack, PrivateRedis, distinctive, leaks, needles
from worker.demo.procs import wait_for
from worker.demo.streams import StreamSpec, generate

pytestmark = pytest.mark.chaos

#: The producer API as a producer's own process calls it: a JSON line, the count or the error.
PUBLISHER = """
import json, sys
from worker.ingest.producer import publish
events = [json.loads(line) for line in open(sys.argv[1])]
try:
    print(json.dumps({"sent": publish(events, int(sys.argv[2]))}))
except Exception as exc:
    kind = f"{type(exc).__module__}.{type(exc).__name__}"
    print(json.dumps({"error": kind, "message": str(exc), "sent": getattr(exc, "sent", None)}))
"""


def api_publish(stack: ChaosStack, events: list[dict[str, Any]], batch: int) -> dict[str, Any]:
    """``worker.ingest.producer.publish`` in a process of its own (the stack's environment)."""
    path = stack.tmp / f"api-{time.monotonic_ns()}.jsonl"
    path.write_text("".join(json.dumps(e) + "\n" for e in events))
    argv = [sys.executable, "-c", PUBLISHER, str(path), str(batch)]
    proc = subprocess.run(argv, env=stack.env, capture_output=True, text=True, timeout=120)
    stack.outputs.append(f"$ publish() {len(events)} events\n{proc.stdout}\n{proc.stderr}")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return dict(json.loads(proc.stdout.strip().splitlines()[-1]))


def memory(redis: PrivateRedis) -> dict[str, int]:
    """used_memory and maxmemory, in bytes."""
    out = redis_cli(redis, "info", "memory")
    fields = dict(line.partition(":")[::2] for line in out.splitlines() if ":" in line)
    return {k: int(fields[k]) for k in ("used_memory", "maxmemory")}


def fill(redis: PrivateRedis) -> None:
    """Redis full: its limit 16 KB below the memory it uses now."""
    used = memory(redis)["used_memory"]
    redis_cli(redis, "config", "set", "maxmemory", str(used - 16 * 1024))


def redis_cli(redis: PrivateRedis, *args: str) -> str:
    argv = ["redis-cli", "-p", str(redis.port), *args]
    return subprocess.run(argv, capture_output=True, text=True, check=True, timeout=10).stdout


def pause(child_pid: int, sig: signal.Signals) -> None:
    os.killpg(child_pid, sig)  # the worker and its pool processes


def test_full_redis_refuses_publishes_loudly_loses_nothing_and_recovers(
    chaos: Chaos, tmp_path: Path
) -> None:
    """Workers paused, a backlog queued, Redis filled: the API raises BrokerFull, the CLI exits
    2 with one line; the paused worker drains the backlog while full; the refused events publish
    once the limit is lifted, and VBA ends exact."""
    chaos.vba()
    redis = chaos.private_redis()
    stack = chaos.stack(broker_url=redis.url)
    events = distinctive(generate(StreamSpec(events=600, members=30, seed=78)))
    backlog, rest = events[:400], events[400:]
    worker = stack.worker("w1", concurrency=2)
    stack.beat()
    pause(worker.pid, signal.SIGSTOP)  # a stuck consumer: the queue grows
    stack.send(backlog, batch=50)
    # Full: the limit below what is used now. (4 KB above it, as before, relied on the next
    # client's buffers to cross it: a key expiring meanwhile, the reliable fetch's heartbeat,
    # let a publish in, 2 runs in 9.) A client's exit frees its buffers, tens of KB, room for
    # a few compressed messages (3 KB for 50 events, 30 before compression): the producers
    # publish one event a message, so they go on until Redis is full, whatever room they found.
    fill(redis)

    refused = api_publish(stack, rest, 1)
    assert refused["error"] == "worker.ingest.producer.BrokerFull", refused
    assert "is full" in refused["message"] and "maxmemory" in refused["message"]
    accepted = rest[: refused["sent"]]
    cli_file = tmp_path / "refused.jsonl"
    cli_file.write_text("".join(json.dumps(e) + "\n" for e in rest[len(accepted) :]))
    fill(redis)  # again: the publisher that just exited freed its client's buffers
    cli = stack.cli("publish", str(cli_file), "--batch-size", "1", check=False)
    cli_line = cli.stderr.strip().splitlines()[-1]
    assert cli.returncode == 4, cli.stdout + cli.stderr
    assert "is full" in cli_line and "Traceback" not in cli.stderr, cli.stderr
    values = needles(events, None)
    assert leaks({"api": refused["message"], "cli": cli.stderr}, values) == []

    # The consumer resumes with Redis still full: taking messages frees memory; it drains.
    resumed_at = time.monotonic()
    pause(worker.pid, signal.SIGCONT)
    queued = len({e["event_id"] for e in backlog + accepted})
    assert wait_for(lambda: stack.received() >= queued, 90, 0.2), stack.logs()[-5000:]
    drained = round(time.monotonic() - resumed_at, 1)
    # Drained, the queue's memory is free, but clients' buffers count too: with a limit this
    # tight, whether a producer would get in now depends on them. Recorded, not asserted.
    after_drain = memory(redis)
    refused_events = rest[len(accepted) :]
    # Idle on a full Redis: whether the drain ended over the limit was left to chance (the
    # reliable fetch's BLMOVE refused stopped the worker, 1 run in 6). Now it always does.
    redis_cli(redis, "config", "set", "maxmemory", "1")
    time.sleep(3)

    lifted_at = time.monotonic()
    redis_cli(redis, "config", "set", "maxmemory", "0")  # memory freed: the limit lifted
    assert "error" not in (again := api_publish(stack, refused_events, 50)), again
    recovered = round(time.monotonic() - lifted_at, 1)
    assert stack.cli("publish", str(cli_file), "--batch-size", "50").returncode == 0
    chaos.drain(stack, len({e["event_id"] for e in events}), timeout=90)
    assert worker.alive(), stack.logs()[-8000:]
    logs = worker.output()
    chaos.finish(
        stack,
        events,
        fault="Redis full (maxmemory, noeviction)",
        injected="private redis-server; the worker paused (SIGSTOP) while 400 events queued, "
        "then CONFIG SET maxmemory 16 KB below used_memory; producer API and CLI publish "
        "refused; the worker resumed (SIGCONT) and drained with Redis full, then idled 3 s "
        "with maxmemory 1; the limit lifted, "
        "the refused events published again (API, then CLI)",
        times=1,
        events_in=len(events),
        extra={
            "events_queued_before_full": len(backlog),
            "events_accepted_after_limit": len(accepted),
            "events_refused_api": len(rest) - len(accepted),
            "api_error": refused["message"],
            "cli_exit_code": cli.returncode,
            "cli_line": cli_line,
            "messages_run_unrecorded_while_full": logs.count("broker.full.unrecorded"),
            "flush_due_publishes_refused": logs.count("raised unexpected: OperationalError"),
            "beat_sends_refused": stack.logs().count("Couldn't apply scheduled task"),
            "seconds_paused_worker_drained_backlog_while_full": drained,
            "maxmemory_bytes": after_drain["maxmemory"],
            "used_memory_after_drain": after_drain["used_memory"],
            "seconds_limit_lifted_to_published": recovered,
        },
    )
