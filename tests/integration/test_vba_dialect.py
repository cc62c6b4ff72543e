"""Speaking VBA's dialect: what the seeds leave unsaid, against the sandbox's strict dialect
(a .NET service on SQL Server behind an API gateway, as docs/vba.md assumes), with real
workers, Redis and Postgres. Each test names the behaviour that would have stopped every write.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from decimal import Decimal
from typing import Any

import pytest

from tests.stack import Stack, remote_totals, same_totals
from worker.demo.sandboxes import SandboxHandle
from worker.demo.streams import StreamSpec, expected_totals, generate
from worker.vba.client import VbaClient

pytestmark = pytest.mark.integration

SUB, GROUP = "S00000077", "GRP77"
NAMES = ("subscriber_ID", "group_ID", "plan_Year", "plan_Type", "benefit_Code")


def claim(n: int, benefit: str, deductible: str, **key: str) -> dict[str, Any]:
    """A new in-network claim on the test member (key fields overridable, as sent)."""
    return {
        "event_id": f"dialect-{n}",
        "claim_id": f"dialect-{n}",
        "version": 0,
        "status": "adjudicated",
        "subscriber_id": key.get("subscriber_id", SUB),
        "group_id": key.get("group_id", GROUP),
        "plan_year": "2026",
        "plan_type": key.get("plan_type", "MED"),
        "benefit_code": benefit,
        "network": "in",
        "amounts": {"deductible": deductible},
    }


def row_key(benefit: str) -> dict[str, str]:
    return dict(zip(NAMES, (SUB, GROUP, "2026", "MED", benefit), strict=True))


def deductibles(sandbox: SandboxHandle) -> dict[str, Decimal]:
    """VBA's deductible_Used of the test member's rows, by benefit code as VBA stores it."""
    return {
        r["benefit_Code"]: Decimal(str(r["deductible_Used"]))
        for r in sandbox.admin.rows()
        if r["subscriber_ID"] == SUB
    }


def letters(stack: Stack, source: str = "flush") -> list[dict[str, Any]]:
    out = stack.cli("dead-letters", "list", "--json", "--source", source, "--show-payload")
    found: list[dict[str, Any]] = json.loads(out.stdout)
    return found


@pytest.mark.parametrize("ownership", ["shared", "exclusive"])
def test_what_we_send_is_bound_by_a_strict_vba(
    flush_stack: Callable[..., Stack], sandboxes: Callable[..., SandboxHandle], ownership: str
) -> None:
    """No null for a <date-time>, our name in the audit trail, the Accept VBA answers with: a
    strict VBA takes every write (before: `entry_Date: null` failed every chunk with a 400)."""
    sandbox = sandboxes(dialect="strict")
    stack = flush_stack(sandbox, ownership=ownership)
    stack.worker("w1", concurrency=2)
    events = generate(StreamSpec(events=600, members=20, seed=61))
    stack.publish(events)
    stack.flush_wait(timeout=120)
    assert same_totals(remote_totals(sandbox.admin.rows()), expected_totals(events)) == []
    writes = [w for w in sandbox.admin.journal() if w["op"] == "accumulators.batch"]
    assert writes and {w["after"]["update_User"] for w in writes} == {"ACCUMSYNC"}
    statuses = sandbox.admin.counters()["by_status"]
    assert "400" not in statuses and "406" not in statuses
    if ownership == "shared":  # new members: VBA answers the list 404, which means no rows
        assert sandbox.admin.counters()["by_route"]["accumulators.list"].get("404")


def test_a_refused_record_is_found_by_splitting_the_batch(
    flush_stack: Callable[..., Stack], sandboxes: Callable[..., SandboxHandle]
) -> None:
    """VBA refuses a whole batch for one record it can't bind: the flush splits the batch until
    that record stands alone, dead-letters only it (VBA's message and activityId) and sends
    the rest (before: the whole chunk became dead letters)."""
    sandbox = sandboxes(dialect="strict", refuse_batch_with="B07")
    stack = flush_stack(sandbox, ownership="exclusive")
    stack.worker("w1")
    benefits = [f"B{i:02d}" for i in range(10)]
    stack.publish([claim(i, b, "10.00") for i, b in enumerate(benefits)])
    proc = stack.cli("flush", "--wait", "--timeout", "60", check=False)
    assert deductibles(sandbox) == {b: Decimal("10.00") for b in benefits if b != "B07"}
    assert proc.returncode == 1  # one new dead letter
    (refused,) = letters(stack)
    assert refused["kind"] == "refused" and refused["activity_id"]
    assert "benefit_Code" in refused["reason"] and "B07" in json.loads(refused["payload"])["key"]
    calls = sum(sandbox.admin.counters()["by_route"]["accumulators.batch"].values())
    assert calls <= 1 + 2 * math.ceil(math.log2(len(benefits)))


def test_a_403_pauses_the_fleet_and_dead_letters_nothing(
    flush_stack: Callable[..., Stack], sandboxes: Callable[..., SandboxHandle]
) -> None:
    """A revoked key (the gateway's 403): calls pause fleet-wide, health says why, nothing
    becomes a dead letter and no token refresh is tried; once fixed, everything lands once."""
    sandbox = sandboxes(dialect="strict")
    stack = flush_stack(sandbox, ownership="shared", backoff_max="6")
    stack.worker("w1", concurrency=2)
    stack.beat()
    events = generate(StreamSpec(events=400, members=15, seed=62))
    sandbox.admin.set_faults(forbidden=True)
    stack.publish(events)
    time.sleep(8)
    calls = sandbox.admin.counters()["by_status"]
    assert 1 <= calls.get("403", 0) <= 6, calls  # beat ticks every second: paused, not hammered
    report = json.loads(stack.cli("health", "--json", "--samples", "1", check=False).stdout)
    (access,) = [c for c in report["checks"] if c["name"] == "vba_access"]
    assert not access["ok"] and "403" in access["reason"]
    assert "vba.forbidden" in stack.logs() and letters(stack) == []
    sandbox.admin.set_faults(forbidden=False)
    stack.flush_wait(timeout=120)
    assert same_totals(remote_totals(sandbox.admin.rows()), expected_totals(events)) == []
    assert "auth.refresh" not in sandbox.admin.counters()["by_route"]


def test_a_stack_on_a_new_sandbox_holds_no_token_an_earlier_one_issued(
    make_stack: Callable[..., Stack],
    redis_url: str,
    sandboxes: Callable[..., SandboxHandle],
) -> None:
    """A sandbox knows no token when it starts, but Redis can still hold the fleet's token that
    an earlier sandbox on the same port issued. A stack pointed at the new one forgets it, so a
    count of VBA's calls holds only the calls the test caused. (test_a_403_... above once saw
    {'accumulators.list': {'401': 2}, 'auth.refresh': {'401': 1}, 'auth.login': {'200': 1}}
    in CI: the stale token refused, its refresh refused, a login.)"""
    sandbox = sandboxes(dialect="strict")
    with VbaClient(sandbox.settings(redis_url=redis_url)) as client:
        client.list_accumulators(SUB, GROUP)  # logs in: the token is in Redis
    sandbox.stop()
    sandbox.start()  # the same port, a VBA that issued no token
    make_stack(broker_url=redis_url).use_sandbox(sandbox.env())
    with VbaClient(sandbox.settings(redis_url=redis_url)) as client:
        client.list_accumulators(SUB, GROUP)
    routes = sandbox.admin.counters()["by_route"]
    assert routes["auth.login"] == {"200": 1} and "auth.refresh" not in routes, routes


def test_keys_vba_takes_as_one_row_are_one_ledger_key(
    flush_stack: Callable[..., Stack], sandboxes: Callable[..., SandboxHandle]
) -> None:
    """`ded`, `DED ` and `Ded` are one row in VBA (case-insensitive, trailing spaces ignored):
    one ledger key, whose writes keep VBA's own spelling of a row it had (before: three keys
    overwriting one row at every flush)."""
    sandbox = sandboxes(dialect="strict")
    sandbox.admin.seed(subscriber=[row_key("Oop") | {"deductible_Used": 5, "ded_PPO_Used": 5}])
    stack = flush_stack(sandbox, ownership="shared")
    stack.worker("w1")
    spellings = ["ded", "DED ", "Ded", "oop", "OOP  "]
    stack.publish([claim(i, b, "10.00") for i, b in enumerate(spellings)])
    stack.flush_wait(timeout=60)
    assert stack.status()["accumulators"] == 2
    assert deductibles(sandbox) == {"DED": Decimal("30.00"), "Oop": Decimal("25.00")}


def test_207_items_with_camel_case_ids_are_matched(
    flush_stack: Callable[..., Stack], sandboxes: Callable[..., SandboxHandle]
) -> None:
    """A VBA answering `subscriberID`/`benefitCode` in its 207 items: every item is found by key
    and confirmed at once (before: none was found, each became an unknown outcome)."""
    sandbox = sandboxes(dialect="strict", id_spelling="camel")
    stack = flush_stack(sandbox, ownership="exclusive")
    stack.worker("w1")
    events = generate(StreamSpec(events=300, members=10, seed=63))
    stack.publish(events)
    out = stack.flush_wait(timeout=60)
    assert "items_failed=0" in out
    assert same_totals(remote_totals(sandbox.admin.rows()), expected_totals(events)) == []
    calls = sandbox.admin.counters()["by_route"]["accumulators.batch"]
    # One 207 per pair: no item taken for an unknown outcome and sent again. A 401 (a token
    # that expired on a loaded machine, refreshed and the call retried) carried no answer.
    assert calls["207"] == len({(e["subscriber_id"], e["group_id"]) for e in events}), calls
    assert set(calls) <= {"207", "401"}, calls


def test_paging_a_pair_in_an_unstable_order_loses_no_row(
    flush_stack: Callable[..., Stack], sandboxes: Callable[..., SandboxHandle]
) -> None:
    """230 rows of VBA's own over three pages, listed in a different order at every call unless
    sorted: the flush asks for a stable order, so no row is skipped and taken as absent (before:
    skipped rows had VBA's own amounts overwritten)."""
    sandbox = sandboxes(dialect="strict")
    benefits = [f"B{i:03d}" for i in range(230)]
    own = [row_key(b) | {"copay_Amt": 7, "copay_Amt_Net": 7} for b in benefits]
    sandbox.admin.seed(subscriber=own)
    stack = flush_stack(sandbox, ownership="shared", vba_batch_max="250")
    stack.worker("w1")
    stack.publish([claim(i, b, "1.00") for i, b in enumerate(benefits)])
    stack.flush_wait(timeout=120)
    rows = [r for r in sandbox.admin.rows() if r["subscriber_ID"] == SUB]
    assert len(rows) == 230
    assert {(Decimal(str(r["copay_Amt"])), Decimal(str(r["deductible_Used"]))) for r in rows} == {
        (Decimal("7.00"), Decimal("1.00"))
    }


def test_odd_vba_rows_do_not_wedge_the_pair(
    flush_stack: Callable[..., Stack], sandboxes: Callable[..., SandboxHandle]
) -> None:
    """A row with a null amount and a 30-character user is read; a row whose amount is not a
    number, or has 3 decimals, refuses only its own key; the rest of the pair is flushed
    (before: one odd row failed the whole read, and the pair retried it for ever)."""
    sandbox = sandboxes(dialect="strict")
    odd = [
        row_key("NULLS") | {"copay_Amt": None, "entry_User": "x" * 30},
        row_key("TEXT") | {"copay_Amt": "lots"},
        row_key("MILLS") | {"copay_Amt": Decimal("1.125"), "copay_Amt_Net": Decimal("1.125")},
    ]
    sandbox.admin.seed(subscriber=odd, raw=True)
    stack = flush_stack(sandbox, ownership="shared")
    stack.worker("w1")
    benefits = ["NULLS", "TEXT", "MILLS", "PLAIN"]
    stack.publish([claim(i, b, "10.00") for i, b in enumerate(benefits)])
    proc = stack.cli("flush", "--wait", "--timeout", "60", check=False)
    got = deductibles(sandbox)
    assert (got["NULLS"], got["PLAIN"]) == (Decimal("10.00"), Decimal("10.00"))
    assert proc.returncode == 1
    refused = {json.loads(d["payload"])["key"][4]: d for d in letters(stack)}
    assert set(refused) == {"TEXT", "MILLS"}
    assert {d["kind"] for d in refused.values()} == {"unreadable"}
    assert "not a number" in refused["TEXT"]["reason"]
    assert "more than 2 decimals" in refused["MILLS"]["reason"]
