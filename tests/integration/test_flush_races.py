"""The money path under races and ambiguity: one test per defect the review of the flush found.

Each runs real workers (Redis broker, Postgres store) against the sandbox over loopback HTTP,
with the sandbox's faults lining the race up: a slow list, a write whose answer is lost, VBA's
own write injected between two of our steps. Each ends comparing VBA's row with the truth, and
reads the sandbox's write journal to see what we actually sent.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from decimal import Decimal
from typing import Any

import pytest
import yaml
from sqlalchemy import select, text, update

from tests.stack import Stack, remote_totals, same_totals
from worker.db import make_engine
from worker.demo.procs import Child, wait_for
from worker.demo.sandboxes import SandboxHandle
from worker.demo.streams import StreamSpec, expected_totals, generate
from worker.store.tables import T_ACCUM, T_PAIR

pytestmark = pytest.mark.integration

SUB, GROUP = "S00000042", "GRP42"
KEY = {"subscriber_ID": SUB, "group_ID": GROUP, "plan_Year": "2026", "plan_Type": "MED"}
KEY_FIELDS = ("subscriber_ID", "group_ID", "plan_Year", "plan_Type", "benefit_Code")
DED = ("deductible_Used", "ded_PPO_Used")  # an in-network deductible: total and in-network


def claim(
    claim_id: str,
    deductible: str = "0",
    *,
    version: int = 1,
    status: str = "adjudicated",
    benefit: str = "DED",
    **extra: Any,
) -> dict[str, Any]:
    """One in-network claim version on the test member's ``benefit`` accumulator."""
    return {
        "event_id": f"{claim_id}-v{version}",
        "claim_id": claim_id,
        "version": version,
        "status": status,
        "subscriber_id": SUB,
        "group_id": GROUP,
        "plan_year": "2026",
        "plan_type": "MED",
        "benefit_code": benefit,
        "network": "in",
        "amounts": {"deductible": deductible},
    } | extra


def deductible(sandbox: SandboxHandle, benefit: str = "DED") -> Decimal | None:
    """VBA's deductible_Used on the test member's row (None: no row)."""
    for row in sandbox.admin.rows():
        if (row["subscriber_ID"], row["benefit_Code"]) == (SUB, benefit):
            assert Decimal(str(row["deductible_Used"])) == Decimal(str(row["ded_PPO_Used"]))
            return Decimal(str(row["deductible_Used"]))
    return None


def our_writes(sandbox: SandboxHandle, benefit: str = "DED") -> list[dict[str, Any]]:
    """The batch writes of accumsync to the row, from the sandbox's journal."""
    return [
        w
        for w in sandbox.admin.journal()
        if w["op"] == "accumulators.batch" and w["key"]["benefit_Code"] == benefit
    ]


def pair(stack: Stack) -> dict[str, Any]:
    """The test member's pair row in the store."""
    engine = make_engine(stack.database_url)
    try:
        with engine.connect() as conn:
            row = conn.execute(select(T_PAIR).where(T_PAIR.c.subscriber_id == SUB)).mappings()
            return dict(row.one())
    finally:
        engine.dispose()


def letters(stack: Stack, source: str = "flush") -> list[dict[str, Any]]:
    out = stack.cli("dead-letters", "list", "--json", "--source", source, "--show-payload")
    found: list[dict[str, Any]] = json.loads(out.stdout)
    return found


def health(stack: Stack) -> dict[str, Any]:
    proc = stack.cli("health", "--json", "--samples", "1", check=False)
    report: dict[str, Any] = json.loads(proc.stdout)
    return report


def check(report: dict[str, Any], name: str) -> dict[str, Any]:
    (found,) = [c for c in report["checks"] if c["name"] == name]
    return found


def test_a_lapsed_lease_cannot_undo_a_newer_flush(
    flush_stack: Callable[..., Stack], sandboxes: Callable[..., SandboxHandle]
) -> None:
    """A stalls in its read past the lease; B flushes 100 + 30; A's read returns: A must send
    nothing (before the fence, A sent 230 from its stale state and confirmed it)."""
    sandbox = sandboxes()
    stack = flush_stack(
        sandbox, ownership="shared", flush_lease="3", vba_timeout="30", settle_grace="120"
    )
    a = stack.worker("a", pool="solo")
    stack.publish([claim("c1", "100.00")])
    sandbox.admin.set_faults(list_delay=20, slow_lists=1)
    stack.cli("flush")  # A leases the pair and waits 20 s for its read
    assert wait_for(lambda: pair(stack)["lease_owner"] is not None, 30, 0.1)
    b = stack.worker("b")
    stack.publish([claim("c2", "30.00")])  # B ingests while A is stuck
    # B's flush below must find c2 ingested, or it sends 100 first (then 130): true totals, but
    # not the race this test is about (seen on a loaded machine, ci65).
    assert wait_for(lambda: stack.items_received() >= 2, 30, 0.1)
    time.sleep(3.5)  # A's lease lapses
    stack.cli("flush")  # B takes the pair over, sends 130, confirms
    assert wait_for(lambda: deductible(sandbox) == Decimal("130.00"), 15, 0.2)
    # A's stale run ends (a loaded machine may hand A a later flush of the pair too: it runs
    # under a lease of its own, and the writes below show whether anything was sent twice).
    assert wait_for(lambda: finished(a, "accumsync.flush_pair") >= 1, 30, 0.2), a.output()
    stack.flush_wait()
    # Nothing from A's stale state (230, or 100 after 130): each write is the total the store
    # held when it was sent, so they rise to 130. B may also send 100 first: A's worker (solo)
    # cannot renew its consumer's heartbeat while its read hangs, so B restores A's message
    # once that lapses and runs it, before c2 is in the totals on a loaded machine (ci2 of
    # 2026-12-05: [100, 130]).
    writes = [w["after"]["deductible_Used"] for w in our_writes(sandbox)]
    assert writes == sorted(writes) and set(writes) <= {100, 130} and writes[-1] == 130, writes
    assert deductible(sandbox) == Decimal("130.00")
    assert "flush.lease_lost" in a.output() and finished(b, "accumsync.flush_pair") >= 1


def finished(worker: Child, task: str) -> int:
    """How many ``task`` runs the worker's log shows as finished."""
    return sum(task in line and "succeeded" in line for line in worker.output().splitlines())


def test_lost_answer_then_vba_write_is_held_for_a_person(
    flush_stack: Callable[..., Stack], sandboxes: Callable[..., SandboxHandle]
) -> None:
    """Our PUT of 100 lands, its answer is lost, VBA adds 50 of its own: 150 is neither what we
    sent nor what we read, so the key is held, health turns red, and an operator settles it
    (before, the next flush took it as not landed and sent 250)."""
    sandbox = sandboxes()
    stack = flush_stack(sandbox, ownership="shared", settle_grace="2", vba_timeout="0.5")
    stack.worker("w1", concurrency=2)
    stack.publish([claim("c1", "100.00")])
    sandbox.admin.set_faults(lost_answers=1)
    sandbox.admin.intrude("batch", SUB, GROUP, {f: "50.00" for f in DED})
    settled = stack.cli("flush", "--wait", "--timeout", "60", check=False)
    assert deductible(sandbox) == Decimal("150.00")
    assert settled.returncode == 1, settled.stdout  # it ends with a new dead letter: the hold
    (held,) = letters(stack)
    assert held["kind"] == "ambiguous" and "resolve" in held["reason"]
    both = json.loads(held["payload"])["candidates"]["deductible_Used"]
    assert both["if_landed"] == {"our_share": "100.00", "vba_own": "50.00"}
    assert both["if_not_landed"] == {"our_share": "0.00", "vba_own": "150.00"}
    report = health(stack)
    assert not report["healthy"] and not check(report, "holds")["ok"]
    assert "held_accumulators" in stack.cli("metrics", "--once").stdout
    stack.cli("dead-letters", "resolve", str(held["id"]), "--landed")
    stack.flush_wait()
    assert deductible(sandbox) == Decimal("150.00")
    assert [w["after"]["deductible_Used"] for w in our_writes(sandbox)] == [100]  # one, landed
    assert check(health(stack), "holds")["ok"]


def test_one_event_id_on_two_claims_in_concurrent_workers_counts_once(
    flush_stack: Callable[..., Stack], sandboxes: Callable[..., SandboxHandle]
) -> None:
    """Two workers ingest one event id on two claims at the same time: the second waits for
    the first and dead-letters a conflict; VBA gets 10.00 (before: 30.00)."""
    sandbox = sandboxes()
    stack = flush_stack(sandbox, ownership="exclusive")
    other = {"ACCUMSYNC_QUEUE": stack.queue + "-2"}
    stack.worker("slow", pool="solo", ACCUMSYNC_FAILPOINT="ingest.before_commit:sleep=4")
    stack.worker("fast", pool="solo", queue=other["ACCUMSYNC_QUEUE"])
    first = claim("ca", "0", event_id="evt-reused", amounts={"copay": "10.00"})
    second = claim("cb", "0", event_id="evt-reused", amounts={"copay": "20.00"})
    stack.publish([first], wait=False)
    time.sleep(1.5)  # "slow" holds its transaction open for 4 s
    stack.publish([second], wait=False, env=other)
    assert wait_for(lambda: stack.items_received() == 2, 60, 0.3)
    stack.flush_wait(timeout=60)
    (row,) = sandbox.admin.rows()
    assert Decimal(str(row["copay_Amt"])) == Decimal("10.00")
    (conflict,) = letters(stack, "ingest")
    assert conflict["reason"] == "event_id: already received with different content"


def test_a_refused_read_backs_the_pair_off_with_its_reason(
    flush_stack: Callable[..., Stack], sandboxes: Callable[..., SandboxHandle]
) -> None:
    """A 4xx on the shared-mode read ends in a recorded state: a backoff naming the refusal
    (before, it escaped the flush: no backoff, no reason, re-listed every beat)."""
    sandbox = sandboxes()
    stack = flush_stack(sandbox, ownership="shared", backoff_base="30", backoff_max="60")
    stack.worker("w1")
    stack.publish([claim("c1", "100.00")])
    sandbox.admin.set_faults(list_status=400)
    stack.cli("flush")
    assert wait_for(lambda: pair(stack)["last_error"] is not None, 30, 0.2)
    row = pair(stack)
    assert "400" in row["last_error"] and row["attempts"] == 1 and row["next_attempt_at"]
    assert row["lease_owner"] is None
    sandbox.admin.set_faults(list_status=None)
    set_pair(stack, next_attempt_at=None)  # the operator does not wait 30 s
    stack.flush_wait(timeout=60)
    assert deductible(sandbox) == Decimal("100.00") and pair(stack)["last_error"] is None


def set_pair(stack: Stack, **values: Any) -> None:
    engine = make_engine(stack.database_url)
    try:
        with engine.begin() as conn:
            conn.execute(update(T_PAIR).where(T_PAIR.c.subscriber_id == SUB).values(**values))
    finally:
        engine.dispose()


def test_a_row_below_our_share_is_held_and_no_negative_amount_is_sent(
    flush_stack: Callable[..., Stack], sandboxes: Callable[..., SandboxHandle]
) -> None:
    """VBA rebuilds the row without our 100, then our claim is reversed: sending ``0 - 100 +
    0`` would write -100. The key is held instead (before: VBA got -100.00)."""
    sandbox = sandboxes()
    stack = flush_stack(sandbox, ownership="shared")
    stack.worker("w1", concurrency=2)
    stack.publish([claim("c1", "100.00")])
    stack.flush_wait()
    sandbox.admin.seed(subscriber=[KEY | {"benefit_Code": "DED"}])  # VBA rebuilt it: all 0
    stack.publish([claim("c1", version=2, status="reversed")])
    settled = stack.cli("flush", "--wait", "--timeout", "60", check=False)
    assert deductible(sandbox) == Decimal("0.00")
    assert settled.returncode == 1, settled.stdout  # it ends with a new dead letter: the hold
    assert all(w["after"]["deductible_Used"] >= 0 for w in sandbox.admin.journal() if w["after"])
    (held,) = letters(stack)
    assert held["kind"] == "below_share"
    assert not check(health(stack), "holds")["ok"]
    stack.cli("dead-letters", "resolve", str(held["id"]), "--not-landed")
    stack.flush_wait()
    assert deductible(sandbox) == Decimal("0.00")


def test_backoff_after_five_days_of_failures_still_backs_off(
    flush_stack: Callable[..., Stack], sandboxes: Callable[..., SandboxHandle]
) -> None:
    """A pair that failed 1,030 times (VBA refusing us for days) backs off within the cap
    (before: ``backoff`` raised OverflowError and the pair retried every beat)."""
    sandbox = sandboxes(down=True)
    stack = flush_stack(sandbox, ownership="exclusive", backoff_base="2", backoff_max="60")
    stack.worker("w1")
    stack.publish([claim("c1", "100.00")])
    set_pair(stack, attempts=1_030)
    stack.cli("flush")
    assert wait_for(lambda: pair(stack)["attempts"] == 1_031, 30, 0.2), stack.logs()[-3000:]
    row = pair(stack)
    assert row["next_attempt_at"] is not None and "503" in row["last_error"]
    assert "OverflowError" not in stack.logs()


def test_each_chunk_reads_vba_right_before_its_write(
    flush_stack: Callable[..., Stack], sandboxes: Callable[..., SandboxHandle]
) -> None:
    """Four keys in chunks of two: VBA writes 7.25 of its own on a key of the second chunk
    after our first PUT. The second chunk's own read sees it (before: one read served every
    chunk, and the second PUT overwrote VBA's 7.25)."""
    sandbox = sandboxes()
    stack = flush_stack(sandbox, ownership="shared", vba_batch_max="2")
    stack.worker("w1")
    benefits = ["B1", "B2", "B3", "B4"]
    stack.publish([claim(f"c-{b}", "10.00", benefit=b) for b in benefits])
    key = {"plan_Year": "2026", "plan_Type": "MED", "benefit_Code": "B4"}
    sandbox.admin.intrude("batch", SUB, GROUP, {f: "7.25" for f in DED}, keys=[key])
    stack.flush_wait()
    assert [deductible(sandbox, b) for b in benefits] == [Decimal("10.00")] * 3 + [Decimal("17.25")]
    reads = sandbox.admin.counters()["by_route"]["accumulators.list"]
    assert sum(reads.values()) == 2  # one read per chunk (the first a 404: a new member)


def test_plan_pushes_retry_and_replays_resend(
    flush_stack: Callable[..., Stack], sandboxes: Callable[..., SandboxHandle], tmp_path: Any
) -> None:
    """A plan push that meets a 503 is retried with backoff until it lands (before: a dead
    letter at once); one that gave up is sent again by ``dead-letters replay`` (before: the
    letter was marked replayed and nothing was sent)."""
    sandbox = sandboxes()
    stack = flush_stack(sandbox, max_attempts="2")
    stack.worker("w1")
    path = tmp_path / "plans.yaml"
    path.write_text(yaml.safe_dump([{"plan_ID": "PLAN1", "accum_Name": "RX-DED"}]))
    sandbox.admin.set_faults(error_503=1.0, retry_after=0.2)
    stack.cli("plans", "push", str(path), check=False)
    sandbox.admin.set_faults(error_503=0.0)
    # Beat starts once VBA is back: a retry of its inside the 503 window would be the second
    # and last of max_attempts, and the plan would rightly give up (a loaded box ran one there).
    stack.beat()
    assert wait_for(lambda: len(sandbox.admin.plans()) == 1, 60, 0.5), stack.logs()[-3000:]
    assert letters(stack, "plans") == []
    path.write_text(yaml.safe_dump([{"plan_ID": "PLAN2", "accum_Name": "RX-OOP"}]))
    sandbox.admin.set_faults(item_error_rate=1.0)
    stack.cli("plans", "push", str(path), check=False)
    assert wait_for(lambda: stack.open_letters("plans") == 1, 60, 0.5), stack.logs()[-3000:]
    sandbox.admin.set_faults(item_error_rate=0.0)
    replayed = stack.cli("dead-letters", "replay", "--source", "plans")
    assert "PLAN2" in replayed.stdout or "re-sent" in replayed.stdout
    assert wait_for(lambda: len(sandbox.admin.plans()) == 2, 60, 0.5)


def test_two_beats_by_mistake_double_nothing(
    flush_stack: Callable[..., Stack], sandboxes: Callable[..., SandboxHandle]
) -> None:
    """Two beats queue every flush twice; the fenced lease lets one flush per pair write."""
    sandbox = sandboxes()
    stack = flush_stack(sandbox, ownership="shared")
    stack.worker("w1", concurrency=3)
    events = generate(StreamSpec(events=1_500, members=40, seed=41))
    stack.publish(events)
    expected = expected_totals(events)
    stack.beat()
    stack.beat("beat2")
    assert wait_for(
        lambda: same_totals(remote_totals(sandbox.admin.rows()), expected) == [], 120, 1
    )
    time.sleep(3)  # more beats tick: nothing left to send, nothing sent twice
    assert same_totals(remote_totals(sandbox.admin.rows()), expected) == []
    written = [w for w in sandbox.admin.journal() if w["op"] == "accumulators.batch"]
    keys = [tuple(w["key"][f] for f in KEY_FIELDS) for w in written]
    assert len(keys) == len(set(keys))  # every key written once, however often beat ticked
    assert set(keys) >= {k for k, row in expected.items() if any(row.values())}
    engine = make_engine(stack.database_url)
    with engine.connect() as conn:
        attempts = conn.execute(text("SELECT count(*) FROM flush_attempt")).scalar_one()
    engine.dispose()
    assert attempts == len({k[:2] for k in keys})  # one batch call per pair


def waiting_since(stack: Stack, benefit: str = "DED") -> Any:
    """The test member's accumulator's ``dirty_since`` (None: clean)."""
    engine = make_engine(stack.database_url)
    try:
        with engine.connect() as conn:
            a = T_ACCUM.c
            query = select(a.dirty_since).where(a.subscriber_id == SUB, a.benefit_code == benefit)
            return conn.execute(query).scalar_one()
    finally:
        engine.dispose()


def test_a_key_changed_during_its_own_flush_is_dated_by_that_change(
    flush_stack: Callable[..., Stack], sandboxes: Callable[..., SandboxHandle]
) -> None:
    """c1 waits; a flush takes the pair (it stalls 4 s before its PUT) and c2 arrives meanwhile.
    The flush confirms c1; the key still waits for c2, dated no earlier than the flush took it,
    not by c1 (before: c1's time, so oldest-first it sorted ahead of keys that waited longer).
    The dispatcher, started once the first flush holds the pair (no beat runs), flushes c2
    promptly: its next flush starts about its spacing (1 s) after the first ends."""
    sandbox = sandboxes()
    stack = flush_stack(sandbox, ownership="shared", flush_lease="15", flush_interval="60")
    stack.worker("w1", concurrency=2, ACCUMSYNC_FAILPOINT="flush.after_intent:sleep=4")
    stack.publish([claim("c1", "100.00")])
    first = waiting_since(stack)
    time.sleep(2)  # c1's age and the flush's take are 2 s apart at least
    stack.cli("flush")
    assert wait_for(lambda: pair(stack)["lease_owner"] is not None, 30, 0.1)
    stack.publish([claim("c2", "30.00")])
    stack.dispatcher()
    assert wait_for(lambda: pair(stack)["lease_owner"] is None, 30, 0.1)
    released = time.monotonic()
    assert deductible(sandbox) == Decimal("100.00")  # c1 only: c2 came after the read
    later = waiting_since(stack)
    assert later is not None and (later - first).total_seconds() >= 2, (first, later)
    landed = wait_for(lambda: deductible(sandbox) == Decimal("130.00"), 30, 0.1)
    assert landed, stack.logs()[-3000:]
    print(f"c2 reached VBA {time.monotonic() - released:.1f} s after the first flush ended")
    assert wait_for(lambda: waiting_since(stack) is None, 10, 0.1)
