"""``accumsync reconcile``: drift planted in the sandbox is found, repaired through the normal
flush, and then reported clean, in both ownerships; an interrupted run resumes without reading
again what it checked, and it never spends more than its share of VBA's rate.

Real workers (Redis broker, Postgres store) and the strict sandbox over loopback HTTP; VBA's own
changes are made through the sandbox's admin API (its adjudication) and VBA's real DELETE route.
"""

from __future__ import annotations

import csv
import json
import signal
import subprocess
import time
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text

from tests.stack import ACCUMSYNC, Stack
from worker.db import make_engine
from worker.demo.procs import wait_for
from worker.demo.sandboxes import SandboxHandle
from worker.vba import VbaClient

pytestmark = pytest.mark.integration

GROUP = "GRP7"
DED = ("deductible_Used", "ded_PPO_Used")
ROW = {"group_ID": GROUP, "plan_Year": "2026", "plan_Type": "MED", "benefit_Code": "DED"}


def sub(n: int) -> str:
    return f"S{n:08d}"


def claim(n: int, amount: str = "100.00") -> dict[str, Any]:
    """Member ``n``'s one in-network claim on their deductible."""
    return {
        "event_id": f"e-{n}",
        "claim_id": f"c-{n}",
        "version": 1,
        "status": "adjudicated",
        "subscriber_id": sub(n),
        "group_id": GROUP,
        "plan_year": "2026",
        "plan_type": "MED",
        "benefit_code": "DED",
        "network": "in",
        "amounts": {"deductible": amount},
    }


def vba_deductible(sandbox: SandboxHandle, n: int) -> Decimal | None:
    rows = [r for r in sandbox.admin.rows() if r["subscriber_ID"] == sub(n)]
    return Decimal(str(rows[0]["deductible_Used"])) if rows else None


def vba_adds(sandbox: SandboxHandle, n: int, amount: str) -> None:
    """VBA's own adjudication moves member ``n``'s deductible by ``amount``."""
    sandbox.admin.adjust({"subscriber_ID": sub(n)} | ROW, {f: amount for f in DED})


def vba_deletes(sandbox: SandboxHandle, n: int) -> None:
    with VbaClient(sandbox.settings()) as vba:
        vba.delete_accumulator(sub(n), GROUP, "2026", "MED", "DED")


def reconcile(stack: Stack, *args: str) -> tuple[int, dict[str, Any]]:
    proc = stack.cli("reconcile", "--all", "--json", *args, check=False)
    assert proc.returncode in (0, 1), proc.stdout + proc.stderr
    return proc.returncode, json.loads(proc.stdout)


def by_member(report: dict[str, Any]) -> dict[int, str]:
    return {int(k["subscriber_id"][1:]): k["finding"] for k in report["keys"]}


@pytest.fixture
def flushed(
    flush_stack: Callable[..., Stack], sandboxes: Callable[..., SandboxHandle]
) -> Callable[[str, int], tuple[Stack, SandboxHandle]]:
    """A stack of ``ownership`` whose ``members`` members each have 100.00 confirmed in VBA."""

    def make(ownership: str, members: int) -> tuple[Stack, SandboxHandle]:
        sandbox = sandboxes()
        stack = flush_stack(sandbox, ownership=ownership)
        stack.worker("w1", concurrency=2)
        stack.publish([claim(n) for n in range(1, members + 1)])
        stack.flush_wait()
        return stack, sandbox

    return make


def test_exclusive_drift_is_found_repaired_and_then_clean(
    flushed: Callable[[str, int], tuple[Stack, SandboxHandle]], tmp_path: Any
) -> None:
    stack, sandbox = flushed("exclusive", 5)
    assert reconcile(stack)[0] == 0
    vba_adds(sandbox, 1, "5.00")  # a field changed
    vba_deletes(sandbox, 2)  # a row deleted: our money is missing from VBA
    vba_adds(sandbox, 3, "-100.00")  # the row reset to zero
    code, report = reconcile(stack, "--csv", str(tmp_path / "drift.csv"))
    assert code == 1
    assert by_member(report) == {1: "drifted", 2: "missing", 3: "drifted"}
    assert report["keys_checked"] == 5 and report["equal"] == 2
    assert report["fields"] == {"deductible_Used": 3, "ded_PPO_Used": 3}
    with (tmp_path / "drift.csv").open() as f:
        lines = list(csv.DictReader(f))
    mine = {(r["subscriber_id"], r["field"]): r for r in lines}
    assert mine[(sub(1), "deductible_Used")]["found"] == "105.00"
    assert mine[(sub(1), "deductible_Used")]["expected"] == "100.00"
    assert mine[(sub(2), "ded_PPO_Used")]["found"] == "absent"

    code, report = reconcile(stack, "--repair")
    assert code == 1 and report["repaired"] == 3
    stack.flush_wait()
    assert [vba_deductible(sandbox, n) for n in range(1, 6)] == [Decimal("100.00")] * 5
    code, report = reconcile(stack)
    assert (code, report["findings"], report["equal"]) == (0, {}, 5)
    scheduled_reconcile_reports_without_repairing(stack, sandbox)
    the_ledger_is_checked_against_itself(stack)


def scheduled_reconcile_reports_without_repairing(stack: Stack, sandbox: SandboxHandle) -> None:
    """What beat queues at ACCUMSYNC_RECONCILE_CRON: a worker checks every pair, logs counts
    (no member data), repairs nothing."""
    vba_adds(sandbox, 4, "1.00")
    celery = str(Path(ACCUMSYNC).with_name("celery"))
    queue = f"{stack.queue}.flush"
    call = [celery, "-A", "worker", "call", "accumsync.reconcile", "--queue", queue]
    subprocess.run(call, env=stack.env, check=True, capture_output=True, timeout=60)
    engine = make_engine(stack.database_url)

    def rows(sql: str) -> list[tuple[Any, ...]]:
        with engine.connect() as conn:
            return [tuple(r) for r in conn.execute(text(sql))]

    try:
        scheduled = "SELECT max(id) FROM reconcile_run WHERE scope = 'all pairs' AND NOT repair"
        done = "SELECT count(*) FROM reconcile_run WHERE finished_at IS NOT NULL"
        assert wait_for(lambda: rows(done)[0][0] == 5, 60, 0.5)
        found = rows(
            f"SELECT finding, repaired FROM reconcile_finding WHERE run_id = ({scheduled})"
        )
    finally:
        engine.dispose()
    assert found == [("drifted", False)]
    # The task logs its slice after the run's row says finished: the log line may trail it.
    assert wait_for(lambda: "reconcile.slice" in stack.logs(), 15, 0.2), stack.logs()[-2000:]
    assert sub(4) not in stack.logs()
    assert vba_deductible(sandbox, 4) == Decimal("101.00")  # reported, not repaired


def the_ledger_is_checked_against_itself(stack: Stack) -> None:
    """A total that the claims don't add up to is drift of our own (no repair can fix it)."""
    engine = make_engine(stack.database_url)
    with engine.begin() as conn:
        conn.execute(
            text(
                "UPDATE accumulator SET deductible_total = deductible_total + 1 "
                "WHERE subscriber_id = :s"
            ),
            {"s": sub(5)},
        )
    engine.dispose()
    code, report = reconcile(stack, "--repair")
    assert code == 1 and by_member(report) == {4: "drifted", 5: "ledger"}
    (ledger,) = next(k for k in report["keys"] if k["finding"] == "ledger")["fields"]
    assert ledger == {
        "of": "ledger",
        "field": "deductible_Used",
        "found": "100.01",
        "expected": "100.00",
        "vba_own": None,
    }
    assert report["repaired"] == 1  # the VBA drift; the ledger's is ours to fix, not VBA's


def test_shared_drift_is_found_repaired_and_then_clean(
    flushed: Callable[[str, int], tuple[Stack, SandboxHandle]],
) -> None:
    stack, sandbox = flushed("shared", 5)
    vba_adds(sandbox, 1, "40.00")  # VBA's own claims: its share, not drift
    vba_adds(sandbox, 2, "-30.00")  # VBA's share gone negative: ours was overwritten
    vba_deletes(sandbox, 3)  # our money missing
    vba_adds(sandbox, 4, "-100.00")  # rebuilt without ours
    code, report = reconcile(stack)
    assert code == 1
    assert by_member(report) == {2: "below_share", 3: "missing", 4: "below_share"}
    below = {d["field"]: d for d in report["keys"][0]["fields"]}
    assert below["deductible_Used"] == {
        "of": "vba",
        "field": "deductible_Used",
        "found": "70.00",
        "expected": ">= 100.00",
        "vba_own": "-30.00",
    }

    # Member 4's row at 0 holds none of our share: repaired. Member 3's row, absent on two reads:
    # repaired. Member 2's 70.00 can't tell which share survived: held for a person, who says
    # VBA's 70.00 is its own (`resolve --not-landed`); the flush then adds our share to it.
    assert reconcile(stack, "--repair")[1]["repaired"] == 2
    (held,) = json.loads(stack.cli("dead-letters", "list", "--json", "--source", "flush").stdout)
    assert held["kind"] == "below_share"
    stack.cli("dead-letters", "resolve", str(held["id"]), "--not-landed")
    stack.flush_wait()
    expected = ["140.00", "170.00", "100.00", "100.00", "100.00"]
    assert [vba_deductible(sandbox, n) for n in range(1, 6)] == [Decimal(e) for e in expected]
    code, report = reconcile(stack)
    assert (code, report["findings"]) == (0, {})


def test_interrupted_it_resumes_without_reading_again_within_its_rate(
    flushed: Callable[[str, int], tuple[Stack, SandboxHandle]],
) -> None:
    stack, sandbox = flushed("exclusive", 24)
    before = list_reads(sandbox)
    rate = 4.0
    first = subprocess.Popen(
        [ACCUMSYNC, "reconcile", "--all", "--rate", str(rate), "--json"],
        env=stack.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # A shell's background job (``cmd &``) starts with SIGINT ignored, and so would this
        # child, which then can't be interrupted: give it the default, as a terminal would.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    assert wait_for(lambda: list_reads(sandbox) - before >= 10, 60, 0.05)
    first.send_signal(signal.SIGINT)
    _, stderr = first.communicate(timeout=30)
    assert first.returncode == 130, stderr
    assert "run the same command again" in stderr
    read_first = list_reads(sandbox) - before

    started = time.monotonic()
    code, report = reconcile(stack, "--rate", str(rate))
    took = time.monotonic() - started
    reads = list_reads(sandbox) - before
    assert code == 0 and report["resumed"] and report["keys_checked"] == 24
    assert 24 <= reads <= 25, reads  # at most the one pair in flight at Ctrl-C is read again
    second = reads - read_first
    assert took >= (second - 1) / rate * 0.9  # its own share: at most `rate` reads a second
    assert sandbox.admin.counters()["by_status"].get("429", 0) == 0


def test_ctrl_c_before_the_first_pair_is_an_interruption_too(
    flushed: Callable[[str, int], tuple[Stack, SandboxHandle]], tmp_path: Path
) -> None:
    """Ctrl-C after the run is begun and before its first pair is checked says how to go on, as
    it does mid-run (it exited 130 without a word: only the progress bar)."""
    stack, _ = flushed("exclusive", 2)
    env = stack.env | {"ACCUMSYNC_FAILPOINT": "reconcile.before_run:sleep=60"}
    log = tmp_path / "stderr.txt"
    with log.open("w") as stderr:
        first = subprocess.Popen(
            [ACCUMSYNC, "reconcile", "--all", "--json"],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )
        assert wait_for(lambda: "failpoint.sleep" in log.read_text(), 30, 0.05), log.read_text()
        first.send_signal(signal.SIGINT)
        first.wait(30)
    said = log.read_text()
    assert first.returncode == 130, said
    assert "interrupted: run the same command again" in said
    code, report = reconcile(stack)
    assert code == 0 and report["resumed"] and report["keys_checked"] == 2


def list_reads(sandbox: SandboxHandle) -> int:
    """GETs of a subscriber's accumulator list the sandbox has answered."""
    by_status = sandbox.admin.counters()["by_route"].get("accumulators.list", {})
    return sum(by_status.values())
