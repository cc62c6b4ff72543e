"""The flush at its edges: statuses that may still land, absences that prove nothing, repairs
field by field. One test per defect the second review found, each over real HTTP to the strict
sandbox with real workers, Redis and Postgres; each failed on the code before its fix (the
issue's note says what each printed there).

The sandbox lines the edge up: a batch call a gateway answers at once (502 or 504) while VBA
writes it later (``late_*`` faults), a 404 from a gateway on the list, a hand edit lowering one
field of a row, a row VBA makes unreadable.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import yaml
from celery import Celery
from sqlalchemy import text

from tests.integration.test_flush_races import KEY, SUB, claim, letters, our_writes
from tests.stack import Stack
from worker.db import make_engine
from worker.demo.procs import wait_for
from worker.demo.sandboxes import SandboxHandle

pytestmark = pytest.mark.integration

DED = ("deductible_Used", "ded_PPO_Used")
COPAY = ("copay_Amt", "copay_Amt_Net")


def field(sandbox: SandboxHandle, name: str, benefit: str = "DED") -> Decimal | None:
    """VBA's ``name`` on the test member's ``benefit`` row (None: no row)."""
    for row in sandbox.admin.rows():
        if (row["subscriber_ID"], row["benefit_Code"]) == (SUB, benefit):
            return Decimal(str(row[name]))
    return None


def batch_answers(sandbox: SandboxHandle, status: int) -> int:
    """How many batch calls the sandbox answered with ``status``."""
    by_route = sandbox.admin.counters()["by_route"].get("accumulators.batch", {})
    return int(by_route.get(str(status), 0))


def stack_on(flush_stack: Callable[..., Stack], sandbox: SandboxHandle, **settings: str) -> Stack:
    stack = flush_stack(sandbox, **settings)
    stack.worker("w1", concurrency=2)
    return stack


def test_a_gateway_502_whose_write_lands_later_is_counted_once(
    flush_stack: Callable[..., Stack], sandboxes: Callable[..., SandboxHandle]
) -> None:
    """A gateway answers 502 at once; VBA writes our 100 half a second later. Nothing proves the
    write finished, so it is settled only after the grace: landed, VBA 100. (Before, the 502
    was taken as "VBA is done": the row read at once was unchanged, the intent dropped, and
    the next flush added our 100 on top of the late write: VBA 200.)"""
    sandbox = sandboxes()
    stack = stack_on(flush_stack, sandbox)
    sandbox.admin.set_faults(late_answers=1, late_status="502", late_seconds=0.5)
    stack.publish([claim("c1", "100.00")])
    stack.flush_wait()
    assert batch_answers(sandbox, 502) == 1
    assert field(sandbox, "deductible_Used") == Decimal("100.00")
    assert [w["after"]["deductible_Used"] for w in our_writes(sandbox)] == [100]


def test_exclusive_waits_the_grace_before_sending_over_a_write_that_may_land(
    flush_stack: Callable[..., Stack], sandboxes: Callable[..., SandboxHandle]
) -> None:
    """Exclusive ownership: our 100 is answered 504 at once and lands 12 s later; meanwhile a
    claim of 30 arrives (beat flushes every second). The new total 130 goes only once the old
    request can no longer land (a 15 s grace), so it lands last: VBA 130. (Before, 130 was
    sent at the next tick and the old 100 landed over it: VBA 100, the key clean.)"""
    sandbox = sandboxes()
    stack = stack_on(flush_stack, sandbox, ownership="exclusive", settle_grace="15")
    stack.beat()
    sandbox.admin.set_faults(late_answers=1, late_status="504", late_seconds=12)
    stack.publish([claim("c1", "100.00")])
    assert wait_for(lambda: batch_answers(sandbox, 504) == 1, 30, 0.05)
    answered = time.monotonic()
    send_now(stack, [claim("c2", "30.00")])
    stack.flush_wait()
    time.sleep(max(0.0, answered + 12.5 - time.monotonic()))  # the late write has landed by now
    assert field(sandbox, "deductible_Used") == Decimal("130.00")
    assert [w["after"]["deductible_Used"] for w in our_writes(sandbox)] == [100, 130]


def send_now(stack: Stack, events: list[dict[str, Any]]) -> None:
    """Publish straight from this process and wait until the store has the events: the CLI
    takes seconds to start on a loaded machine, and these tests race a late write."""
    app = Celery(broker=stack.env["ACCUMSYNC_BROKER_URL"])
    try:
        app.send_task("accumsync.ingest", args=[events], queue=stack.queue)
    finally:
        app.close()
    engine = make_engine(stack.database_url)
    ids = [e["event_id"] for e in events]
    query = text("SELECT count(*) FROM received_event WHERE event_id = ANY(:ids)")
    try:
        with engine.connect() as conn:
            got = lambda: conn.execute(query, {"ids": ids}).scalar() == len(ids)  # noqa: E731
            assert wait_for(got, 30, 0.05)
    finally:
        engine.dispose()


def consume(stack: Stack, worker: str, queue: str) -> None:
    """Have a running worker consume ``queue`` too (Celery's remote control)."""
    node = f"{worker}-{stack.queue}@{socket.gethostname()}"
    app = Celery(broker=stack.env["ACCUMSYNC_BROKER_URL"])
    try:
        replies = app.control.add_consumer(queue, destination=[node], reply=True, timeout=10)
    finally:
        app.close()
    assert replies, f"{node} did not answer"


def test_a_takeover_waits_for_a_dead_holders_write_even_when_the_lease_outlasts_the_grace(
    flush_stack: Callable[..., Stack], sandboxes: Callable[..., SandboxHandle]
) -> None:
    """Flush lease 8 s, grace 6 s (settings the validator accepts). Holder A sends our 100; a
    gateway answers 504 at once and VBA writes it 13 s later; A dies right after its PUT.
    B takes the lapsed lease after 8 s (beat ticks every second) with a claim of 30 more to
    send. A's intent may still land until a grace after B took over, so B waits, finds 100
    landed, and sends 130 over it: VBA 130. (Before, A's intent was past its grace when B
    came: B read the row as before, sent 130, and A's 100 landed over it: VBA 100, the key
    clean.)"""
    sandbox = sandboxes()
    stack = flush_stack(sandbox, ownership="shared", flush_lease="8")
    flushes = f"{stack.queue}.flush"
    stack.worker("b", concurrency=2, queue=stack.queue)  # ingests; flushes only once A is gone
    a = stack.worker("a", pool="solo", queue=flushes, ACCUMSYNC_FAILPOINT="flush.after_put")
    stack.beat()
    sandbox.admin.set_faults(late_answers=1, late_status="504", late_seconds=13)
    stack.publish([claim("c1", "100.00")])
    assert wait_for(lambda: not a.alive(), 60, 0.05), a.output()
    sent = time.monotonic()
    send_now(stack, [claim("c2", "30.00")])
    consume(stack, "b", flushes)
    stack.flush_wait(timeout=120)
    time.sleep(max(0.0, sent + 13.5 - time.monotonic()))  # A's write has landed by now
    assert field(sandbox, "deductible_Used") == Decimal("130.00")
    assert [w["after"]["deductible_Used"] for w in our_writes(sandbox)] == [100, 130]


def test_a_gateway_404_on_the_list_is_not_an_empty_row(
    flush_stack: Callable[..., Stack], sandboxes: Callable[..., SandboxHandle]
) -> None:
    """VBA's row holds 40.00 of its own; the list is answered 404 by a gateway (no VBA
    envelope). That proves nothing about the rows: the pair backs off and reads again, and
    VBA gets 40 + 100. (Before, any 404 was "no rows": target = ours, VBA 100, its own 40.00
    overwritten and the key clean.)"""
    sandbox = sandboxes()
    stack = stack_on(flush_stack, sandbox)
    sandbox.admin.adjust(KEY | {"benefit_Code": "DED"}, dict.fromkeys(DED, "40.00"))
    sandbox.admin.set_faults(list_gateway_404s=1)
    stack.publish([claim("c1", "100.00")])
    stack.flush_wait()
    assert field(sandbox, "deductible_Used") == Decimal("140.00")
    assert [w["after"]["deductible_Used"] for w in our_writes(sandbox)] == [140]


def test_reconcile_repairs_nothing_on_a_gateway_404(
    flush_stack: Callable[..., Stack], sandboxes: Callable[..., SandboxHandle]
) -> None:
    """Our 100 is confirmed in VBA; reconcile --repair reads the pair through a gateway that
    answers 404. Nothing is repaired, and VBA keeps 100. (Before, the 404 read as "no rows":
    the repair set our share to 0 and the next flush added 100 on top: VBA 200.)"""
    sandbox = sandboxes()
    stack = stack_on(flush_stack, sandbox)
    stack.publish([claim("c1", "100.00")])
    stack.flush_wait()
    sandbox.admin.set_faults(list_gateway_404s=1)
    repair = stack.cli("reconcile", "--all", "--repair", "--json", check=False)
    assert repair.returncode == 2 and "404" in repair.stderr, repair.stdout + repair.stderr
    stack.publish([claim("c2", "0.00", benefit="OOP")])  # a flush of the pair reads it again
    stack.flush_wait()
    assert field(sandbox, "deductible_Used") == Decimal("100.00")


def two_fields(stack: Stack, sandbox: SandboxHandle) -> None:
    """Our claim of 100 deductible and 30 copay, confirmed; then a hand edit in VBA lowers the
    deductible alone to 20."""
    stack.publish([claim("c1", "100.00", amounts={"deductible": "100.00", "copay": "30.00"})])
    stack.flush_wait()
    sandbox.admin.adjust(KEY | {"benefit_Code": "DED"}, dict.fromkeys(DED, "-80.00"))


def below_fields(letter: dict[str, Any]) -> list[str]:
    payload = json.loads(letter["payload"])
    return sorted(f for f, v in payload.items() if isinstance(v, dict) and "vba_now" in v)


def test_a_repair_of_one_lowered_field_changes_that_field_only(
    flush_stack: Callable[..., Stack], sandboxes: Callable[..., SandboxHandle]
) -> None:
    """VBA's deductible was lowered to 20 (below our 100); its copay still holds our 30. The
    repair can't tell which share of the deductible survived: it holds the key with a letter
    naming the deductible only, and the operator's answer changes that field only: copay stays
    30. (Before, the repair zeroed our share in all 30 fields and the flush sent copay 60.)"""
    sandbox = sandboxes()
    stack = stack_on(flush_stack, sandbox)
    two_fields(stack, sandbox)
    stack.cli("reconcile", "--all", "--repair", check=False)
    stack.flush_wait()  # (the repair made its hold: no flush of it adds one)
    assert field(sandbox, "copay_Amt") == Decimal("30.00")
    (held,) = letters(stack)
    assert (held["kind"], below_fields(held)) == ("below_share", sorted(DED))
    stack.cli("dead-letters", "resolve", str(held["id"]), "--not-landed")
    stack.flush_wait()
    assert field(sandbox, "copay_Amt") == Decimal("30.00")
    assert field(sandbox, "deductible_Used") == Decimal("120.00")


def test_resolving_a_below_share_hold_changes_the_fields_it_names_only(
    flush_stack: Callable[..., Stack], sandboxes: Callable[..., SandboxHandle]
) -> None:
    """The same lowered deductible, found by the flush when a claim adds 5.00 copay: held,
    the letter names the deductible only, and `resolve --not-landed` re-adds our share there
    only: copay 35, deductible 20 + 100. (Before, it re-added our share to every field: copay
    65.00.)"""
    sandbox = sandboxes()
    stack = stack_on(flush_stack, sandbox)
    two_fields(stack, sandbox)
    stack.publish([claim("c2", "0.00", amounts={"copay": "5.00"})])
    stack.flush_wait(expect=1)
    (held,) = letters(stack)
    assert (held["kind"], below_fields(held)) == ("below_share", sorted(DED))
    stack.cli("dead-letters", "resolve", str(held["id"]), "--not-landed")
    stack.flush_wait()
    assert field(sandbox, "copay_Amt") == Decimal("35.00")
    assert field(sandbox, "deductible_Used") == Decimal("120.00")


def test_a_refused_unreadable_row_keeps_the_write_it_has_not_settled(
    flush_stack: Callable[..., Stack], sandboxes: Callable[..., SandboxHandle]
) -> None:
    """Our 100 lands, its answer is lost; then VBA's row turns unreadable (a 4-decimal copay),
    so the key is refused. The refusal keeps the unsettled write; once the row is fixed and the
    letter replayed, the flush settles it (landed) and sends nothing more: VBA 100. (Before,
    the refusal dropped the write's record, and the replay sent our share again: VBA 200.)"""
    sandbox = sandboxes()
    stack = stack_on(flush_stack, sandbox)
    sandbox.admin.set_faults(lost_answers=1)
    stack.publish([claim("c1", "100.00")])
    stack.cli("flush")
    assert wait_for(lambda: field(sandbox, "deductible_Used") == Decimal("100.00"), 30, 0.1)
    odd = KEY | {"benefit_Code": "DED"}
    sandbox.admin.adjust(odd, {"copay_Amt": "0.0005", "copay_Amt_Net": "0.0005"})
    stack.flush_wait(expect=1)
    (refused,) = letters(stack)
    assert refused["kind"] == "unreadable"
    sandbox.admin.adjust(odd, {"copay_Amt": "-0.0005", "copay_Amt_Net": "-0.0005"})
    stack.cli("dead-letters", "replay", "--id", str(refused["id"]))
    stack.flush_wait()
    assert field(sandbox, "deductible_Used") == Decimal("100.00")
    assert [w["after"]["deductible_Used"] for w in our_writes(sandbox)] == [100]
    assert json.loads(refused["payload"])["unsettled_write"]["target"]["deductible_total"] == 10000


def test_a_plan_push_never_lands_under_an_older_one(
    flush_stack: Callable[..., Stack], sandboxes: Callable[..., SandboxHandle], tmp_path: Path
) -> None:
    """A push of the plan's deductible at 500.00 is answered 504 at once and lands 2 s later;
    the operator pushes 750.00 meanwhile. 750 waits until 500 can no longer land, then goes:
    VBA 750. (Before, 750 was sent at once and recorded as sent; 500 landed after it, and
    pushing the 750 file again printed "unchanged, skipped": VBA kept 500.)"""
    sandbox = sandboxes()
    stack = stack_on(flush_stack, sandbox)
    stack.beat()
    older, newer = tmp_path / "older.yaml", tmp_path / "newer.yaml"
    plan = {"plan_ID": "PPO26", "accum_Name": "RXDED"}
    older.write_text(yaml.safe_dump([plan | {"member_Deductible": 500}]))
    newer.write_text(yaml.safe_dump([plan | {"member_Deductible": 750}]))
    sandbox.admin.set_faults(late_answers=1, late_status="504", late_seconds=2)
    stack.cli("plans", "push", str(older), check=False)
    pushed = stack.cli("plans", "push", str(newer), check=False)

    def deductible() -> str | None:
        rows = [p for p in sandbox.admin.plans() if p["accum_Name"] == "RXDED"]
        return str(rows[0]["member_Deductible"]) if rows else None

    assert wait_for(lambda: deductible() == "500.00", 30, 0.1)  # the older one landed
    assert wait_for(lambda: deductible() == "750.00", 30, 0.2), stack.logs()[-3000:]
    assert "queued" in pushed.stdout, pushed.stdout
    assert "unchanged" in stack.cli("plans", "push", str(newer)).stdout


def test_keys_vba_would_fold_together_beyond_ascii_are_refused_at_ingest(
    flush_stack: Callable[..., Stack], sandboxes: Callable[..., SandboxHandle]
) -> None:
    """ "CAFÉ" and "café" are one row to SQL Server's collation, two to an ASCII fold: each
    would write its absolute total to the same VBA row. They are refused at ingest with the
    field and the rule, and nothing reaches VBA. (Before, both were ledger keys, and VBA ended
    with one of their totals, 30.00 where the truth was 130.00.)"""
    sandbox = sandboxes()
    stack = stack_on(flush_stack, sandbox)
    stack.publish([claim("c1", "100.00", benefit="CAFÉ"), claim("c2", "30.00", benefit="café")])
    stack.flush_wait(timeout=30)
    refused = letters(stack, "ingest")
    assert len(refused) == 2
    assert all("benefit_code: must be printable ASCII" in r["reason"] for r in refused)
    assert sandbox.admin.rows() == []
