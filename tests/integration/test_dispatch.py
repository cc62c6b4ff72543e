"""The dispatcher (``accumsync dispatch``): a change starts its flush at once, not at beat's next
tick; one dispatcher leads, a second waits and takes over; with none, beat's sweep flushes."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable
from decimal import Decimal

import pytest

from tests.integration.test_flush_races import claim, deductible
from tests.stack import Stack, remote_totals, same_totals
from worker.demo.procs import Child, wait_for
from worker.demo.sandboxes import SandboxHandle
from worker.demo.streams import StreamSpec, expected_totals, generate

pytestmark = pytest.mark.integration

TICK = re.compile(r"Scheduler: Sending due task flush-due")


def exact(sandbox: SandboxHandle, events: list[dict[str, object]]) -> bool:
    return same_totals(remote_totals(sandbox.admin.rows()), expected_totals(events)) == []


def leads(dispatcher: Child) -> bool:
    """Whether the dispatcher's last word is that it leads (a loaded machine may stall a leader
    past its lease: the other takes over, and the stalled one says it waits)."""
    out = dispatcher.output()
    return out.rfind("dispatch.leading") > out.rfind("dispatch.waiting")


def dispatcher_check(stack: Stack) -> dict[str, object]:
    proc = stack.cli("health", "--json", "--samples", "1", check=False)
    (check,) = [c for c in json.loads(proc.stdout)["checks"] if c["name"] == "dispatcher"]
    return dict(check)


def test_a_change_reaches_vba_in_seconds_with_beat_a_minute_apart(
    flush_stack: Callable[..., Stack], sandboxes: Callable[..., SandboxHandle]
) -> None:
    """Beat ticks once a minute (its first tick a minute after it starts); a claim published
    meanwhile is in VBA within seconds, before any tick could have queued its flush."""
    sandbox = sandboxes()
    stack = flush_stack(sandbox, flush_interval="60")
    stack.worker("w1", concurrency=2)
    beat = stack.beat()
    ticked = time.monotonic()  # beat started: its first flush_due goes 60 s from now
    dispatcher = stack.dispatcher()
    assert wait_for(lambda: leads(dispatcher), 15, 0.1), dispatcher.output()
    published = time.monotonic()
    stack.publish([claim("c1", "100.00")])
    assert wait_for(lambda: deductible(sandbox) == Decimal("100.00"), 30, 0.05), stack.logs()
    landed = time.monotonic()
    print(f"published -> in VBA: {landed - published:.2f} s (beat's first tick at 60 s)")
    assert landed < ticked + 60, (landed - published, landed - ticked)
    assert TICK.search(beat.output()) is None  # no flush_due of beat's in between
    assert dispatcher_check(stack)["reason"].startswith("leading: ")  # type: ignore[union-attr]


def test_two_dispatchers_one_leads_and_a_killed_leader_is_replaced(
    flush_stack: Callable[..., Stack], sandboxes: Callable[..., SandboxHandle]
) -> None:
    """No beat at all: two dispatchers, one leads; the stream lands exact (nothing doubled);
    the leader SIGKILLed, the other leads and the rest lands exact too."""
    sandbox = sandboxes()
    stack = flush_stack(sandbox, flush_interval="60", ownership="shared")
    stack.worker("w1", concurrency=3)
    first, second = stack.dispatcher("d1"), stack.dispatcher("d2")
    events = generate(StreamSpec(events=300, members=20, seed=61))
    stack.publish(events[:150])
    assert wait_for(lambda: exact(sandbox, events[:150]), 60, 0.2), stack.logs()[-3000:]
    leaders = [d for d in (first, second) if leads(d)]
    assert len(leaders) == 1, [d.output()[-1500:] for d in (first, second)]
    (leader,) = leaders
    other = second if leader is first else first
    leader.kill()
    stack.publish(events[150:])
    assert wait_for(lambda: exact(sandbox, events), 60, 0.2), stack.logs()[-3000:]
    assert leads(other), other.output()


def test_with_the_dispatcher_dead_beat_flushes_everything(
    flush_stack: Callable[..., Stack], sandboxes: Callable[..., SandboxHandle]
) -> None:
    """The dispatcher SIGKILLed: once its lease lapses, beat's sweep flushes every pair again
    (not only the overdue ones, as while a dispatcher leads), and health says none leads."""
    sandbox = sandboxes()
    stack = flush_stack(sandbox)
    stack.worker("w1", concurrency=2)
    dispatcher = stack.dispatcher()
    assert wait_for(lambda: leads(dispatcher), 15, 0.1), dispatcher.output()
    dispatcher.kill()
    stack.beat()
    events = generate(StreamSpec(events=300, members=20, seed=62))
    stack.publish(events)
    stack.flush_wait(timeout=60)
    assert exact(sandbox, events)
    assert dispatcher_check(stack)["reason"] == "none leads: each flush waits for beat's next tick"


def test_the_flush_worker_on_threads_is_exact_against_a_slow_faulty_vba(
    flush_stack: Callable[..., Stack], sandboxes: Callable[..., SandboxHandle]
) -> None:
    """compose.yaml's flush worker, ``-P threads -c 16`` (bench.freshness --sweep chose it: at
    300 ms per VBA answer, prefork's 4 processes used half the budget), fed by the dispatcher
    beside an ingest worker, against a VBA that answers in 300 ms and fails calls and items:
    every total exact, and no batch call for a pair began while another was in flight."""
    sandbox = sandboxes(
        latency=0.3, error_500=0.05, error_503=0.05, item_error_rate=0.1, shuffle=True, seed=63
    )
    stack = flush_stack(sandbox, ownership="shared", flush_interval="60")
    stack.worker("ingest", concurrency=1, queue=stack.queue)
    stack.worker("flush", concurrency=16, queue=f"{stack.queue}.flush", pool="threads")
    stack.beat()  # retries wait in the store for their time (swept as overdue, or admitted)
    stack.dispatcher()
    events = generate(StreamSpec(events=1_500, members=60, seed=63))
    stack.publish(events)
    assert wait_for(lambda: exact(sandbox, events), 180, 0.5), stack.logs()[-4000:]
    counters = sandbox.admin.counters()
    assert counters["by_status"].get("500") and counters["by_status"].get("503")
    assert counters["overlapping_batches"] == 0
