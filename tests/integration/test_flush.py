"""Flush end to end: worker, beat, the sandbox over HTTP, Redis and Postgres, exact to the cent.

Every test ends with the sandbox's rows equal to totals computed independently from the events
(plus, in shared ownership, VBA's own amounts).
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from tests.stack import Stack, remote_totals, same_totals
from worker.demo.procs import wait_for
from worker.demo.sandboxes import SandboxHandle
from worker.demo.streams import Key, StreamSpec, expected_totals, generate

pytestmark = pytest.mark.integration


def plus(*maps: dict[Key, dict[str, Decimal]]) -> dict[Key, dict[str, Decimal]]:
    """Key-wise, field-wise sum of totals maps."""
    out: dict[Key, dict[str, Decimal]] = {}
    for m in maps:
        for key, row in m.items():
            acc = out.setdefault(key, {})
            for field, value in row.items():
                acc[field] = acc.get(field, Decimal(0)) + value
    return out


def test_clean_run_with_beat(
    flush_stack: Callable[..., Stack], sandboxes: Callable[..., SandboxHandle], tmp_path: Path
) -> None:
    """Beat flushes everything published; VBA's rows equal the independent totals."""
    sandbox = sandboxes()
    stack = flush_stack(sandbox)
    stack.worker("w1", concurrency=2)
    stack.beat()
    events = generate(StreamSpec(events=2_000, members=80, seed=21))
    stack.publish(events)
    expected = expected_totals(events)
    assert wait_for(
        lambda: same_totals(remote_totals(sandbox.admin.rows()), expected) == [], 120, 1
    )
    assert stack.status()["waiting_for_flush"] == 0 or stack.flush_wait()


def test_faults_retries_and_token_expiry(
    flush_stack: Callable[..., Stack], sandboxes: Callable[..., SandboxHandle], tmp_path: Path
) -> None:
    """20% 5xx, a 429 storm, item-level 500s, shuffled data[] and expiring tokens: exact anyway."""
    faults = {
        "error_500": 0.1,
        "error_503": 0.1,
        "item_error_rate": 0.15,
        "shuffle": True,
        "rate_429": 0.05,
        "retry_after": 0.2,
        "seed": 5,
    }
    sandbox = sandboxes(**faults)
    stack = flush_stack(sandbox)
    stack.worker("w1", concurrency=2)
    stack.beat()
    events = generate(StreamSpec(events=1_000, members=30, seed=22))
    stack.publish(events[:500])
    stack.flush_wait()  # the fleet holds a token now
    sandbox.admin.set_faults(rate_429=1.0)  # a storm: everything answered 429 for a while
    stack.publish(events[500:])
    time.sleep(3)
    sandbox.admin.set_faults(rate_429=0.05, expire_tokens=True)  # and every token dies at once
    stack.flush_wait()
    assert same_totals(remote_totals(sandbox.admin.rows()), expected_totals(events)) == []
    counters = sandbox.admin.counters()
    counts = counters["by_status"]
    assert counts.get("429") and counts.get("503") and counts.get("500") and counts.get("401")
    assert counters["by_route"]["auth.refresh"]  # the expired token was refreshed, not lost


def test_sandbox_down_for_a_while(
    flush_stack: Callable[..., Stack], sandboxes: Callable[..., SandboxHandle], tmp_path: Path
) -> None:
    """VBA unreachable mid-flush: the backlog waits, and drains exactly once VBA is back."""
    sandbox = sandboxes(state=str(tmp_path / "vba.db"))
    stack = flush_stack(sandbox)
    stack.worker("w1", concurrency=2)
    events = generate(StreamSpec(events=1_500, members=60, seed=23))
    stack.publish(events)
    sandbox.stop()
    stack.cli("flush")  # flushes fail against a closed port
    time.sleep(4)
    assert stack.status()["waiting_for_flush"] > 0
    sandbox.start()
    stack.flush_wait()
    assert same_totals(remote_totals(sandbox.admin.rows()), expected_totals(events)) == []


KEY_NAMES = ("subscriber_ID", "group_ID", "plan_Year", "plan_Type", "benefit_Code")


def vba_rows(keys: list[Key], **amounts: Decimal) -> list[dict[str, Any]]:
    """VBA rows of "VBA's own claims": ``amounts`` on each of ``keys``."""
    return [dict(zip(KEY_NAMES, k, strict=True)) | amounts for k in keys]


def own_keys(events: list[dict[str, Any]]) -> list[Key]:
    """Every other key our events touch: VBA has amounts of its own there."""
    return sorted(expected_totals(events))[::2]


def test_shared_ownership_keeps_vba_amounts(
    flush_stack: Callable[..., Stack], sandboxes: Callable[..., SandboxHandle], tmp_path: Path
) -> None:
    """VBA's own amounts survive two flushes, changed between them; ours are added once."""
    sandbox = sandboxes()
    stack = flush_stack(sandbox, ownership="shared")
    stack.worker("w1", concurrency=2)
    events = generate(StreamSpec(events=2_000, members=50, seed=24))
    first, second = events[:1_000], events[1_000:]
    keys, d40 = own_keys(events), Decimal("40.00")
    own = vba_rows(keys, deductible_Used=d40, ded_PPO_Used=d40, copay_Amt=d40, copay_Amt_OON=d40)
    sandbox.admin.seed(subscriber=own)
    stack.publish(first)
    stack.flush_wait()
    expected = plus(remote_totals(own), expected_totals(first))
    assert same_totals(remote_totals(sandbox.admin.rows()), expected) == []
    extra = Decimal("7.25")
    later = vba_rows(keys[::3], deductible_Used=extra, ded_PPO_Used=extra)
    for row in later:  # VBA adjudicates more claims of its own on some rows
        key = {k: row[k] for k in KEY_NAMES}
        sandbox.admin.adjust(key, {"deductible_Used": str(extra), "ded_PPO_Used": str(extra)})
    stack.publish(second)
    stack.flush_wait()
    expected = plus(remote_totals(own), remote_totals(later), expected_totals(events))
    assert same_totals(remote_totals(sandbox.admin.rows()), expected) == []


def test_sigkill_after_put_counts_nothing_twice(
    flush_stack: Callable[..., Stack], sandboxes: Callable[..., SandboxHandle], tmp_path: Path
) -> None:
    """A worker killed right after the PUT, before its bookkeeping: after restart, exact totals."""
    sandbox = sandboxes()
    stack = flush_stack(sandbox, ownership="shared")
    events = generate(StreamSpec(events=800, members=20, seed=25))
    d13 = Decimal("13.00")
    own = vba_rows(own_keys(events), deductible_Used=d13, ded_PPO_Used=d13)
    sandbox.admin.seed(subscriber=own)
    ingester = stack.worker("ingest")
    stack.publish(events)
    ingester.stop()
    doomed = stack.worker("doomed", pool="solo", ACCUMSYNC_FAILPOINT="flush.after_put")
    stack.cli("flush")
    assert wait_for(lambda: not doomed.alive(), 60), "the failpoint did not fire"
    assert "failpoint.kill" in doomed.output()
    batches = sandbox.admin.counters()["by_route"]["accumulators.batch"]
    assert batches == {"207": 1}  # the PUT landed; nothing recorded it
    stack.worker("after", concurrency=2)
    stack.flush_wait()
    expected = plus(remote_totals(own), expected_totals(events))
    assert same_totals(remote_totals(sandbox.admin.rows()), expected) == []
    assert re.search(r"'recovered': [1-9]", stack.logs())  # settled by reading VBA's row


def test_one_batch_call_per_dirty_pair(
    flush_stack: Callable[..., Stack], sandboxes: Callable[..., SandboxHandle], tmp_path: Path
) -> None:
    """However many events touched a pair, one flush sends it in one batch call (exclusive)."""
    sandbox = sandboxes()
    stack = flush_stack(sandbox, ownership="exclusive")
    stack.worker("w1", concurrency=2)
    events = generate(StreamSpec(events=3_000, members=120, seed=26))
    stack.publish(events)
    expected = expected_totals(events)
    dirty_pairs = {k[:2] for k, row in expected.items() if any(row.values())}
    stack.flush_wait()
    routes = sandbox.admin.counters()["by_route"]
    assert sum(routes["accumulators.batch"].values()) == len(dirty_pairs)
    assert "accumulators.list" not in routes  # exclusive ownership reads nothing
    assert same_totals(remote_totals(sandbox.admin.rows()), expected) == []
