"""`accumsync plans push` and `accumsync dead-letters replay` against the sandbox over HTTP."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest
import yaml

from tests.stack import Stack, remote_totals, same_totals
from worker.demo.procs import wait_for
from worker.demo.sandboxes import SandboxHandle, running_sandbox
from worker.demo.streams import StreamSpec, expected_totals, generate

pytestmark = pytest.mark.integration

PLANS = [
    {"plan_ID": "PPO2026", "accum_Name": "RXOOP", "ooP_Max_Mem": 3000, "ooP_Max_Sub": 6000},
    {"plan_ID": "PPO2026", "accum_Name": "RXDED", "member_Deductible": 250.5},
    {"plan_ID": "HDHP26", "accum_Name": "VISION", "annual_Max": 400},
]


@pytest.fixture
def sandbox() -> Iterator[SandboxHandle]:
    with ExitStack() as stack:
        yield stack.enter_context(running_sandbox())


@pytest.fixture
def stack(make_stack: Callable[..., Stack], sandbox: SandboxHandle) -> Stack:
    """An embedded-defaults stack pointed at the sandbox, migrated, quick to retry."""
    st = make_stack(flush_interval="1", backoff_base="0.1", backoff_max="0.5", flush_lease="5")
    st.use_sandbox(sandbox.env())
    st.migrate()
    return st


def plan_batches(sandbox: SandboxHandle) -> int:
    return sum(sandbox.admin.counters()["by_route"].get("plans.batch", {}).values())


def test_plans_push_sends_changed_plans_only(
    stack: Stack, sandbox: SandboxHandle, tmp_path: Path
) -> None:
    """Each plan goes in one batch; unchanged plans are skipped; a changed plan is sent again."""
    path = tmp_path / "plans.yaml"
    path.write_text(yaml.safe_dump({"plans": PLANS}))
    first = stack.cli("plans", "push", str(path))
    assert first.stdout.count("sent") == 2
    stored = {(p["plan_ID"], p["accum_Name"]): p for p in sandbox.admin.plans()}
    assert set(stored) == {(p["plan_ID"], p["accum_Name"]) for p in PLANS}
    assert str(stored[("PPO2026", "RXDED")]["member_Deductible"]) == "250.50"
    assert plan_batches(sandbox) == 2
    again = json.loads(stack.cli("plans", "push", str(path), "--json").stdout)
    assert [p["outcome"] for p in again["plans"]] == ["unchanged, skipped"] * 2
    assert (again["failed"], again["pending"], plan_batches(sandbox)) == (0, 0, 2)
    changed = [dict(PLANS[0], ooP_Max_Mem=3500), *PLANS[1:]]
    path.write_text(yaml.safe_dump(changed))
    stack.cli("plans", "push", str(path))
    assert plan_batches(sandbox) == 3


def test_plans_push_refuses_an_invalid_file(stack: Stack, tmp_path: Path) -> None:
    """A record breaking the seed's rules stops the push, naming the record and the field."""
    path = tmp_path / "plans.json"
    path.write_text(json.dumps([PLANS[0], {"plan_ID": "X", "annual_Max": "lots"}]))
    proc = stack.cli("plans", "push", str(path), check=False)
    assert proc.returncode == 2
    message = " ".join(proc.stderr.split())
    assert "record 1: accum_Name: Field required; annual_Max:" in message


def test_plans_push_dead_letters_refused_items(
    stack: Stack, sandbox: SandboxHandle, tmp_path: Path
) -> None:
    """Items VBA fails inside the 207 are retried; once the attempts run out (here the first)
    they become dead letters with VBA's activityId and the command exits non-zero."""
    path = tmp_path / "plans.yaml"
    path.write_text(yaml.safe_dump(PLANS))
    sandbox.admin.set_faults(item_error_rate=1.0)
    proc = stack.cli("plans", "push", str(path), check=False, env={"ACCUMSYNC_MAX_ATTEMPTS": "1"})
    assert proc.returncode == 1
    letters = json.loads(stack.cli("dead-letters", "list", "--json", "--source", "plans").stdout)
    assert len(letters) == 3 and all(d["activity_id"] for d in letters)


def test_replay_of_a_still_invalid_event_reopens_its_letter(stack: Stack, tmp_path: Path) -> None:
    """A replayed event that is still invalid comes back as the same letter, counted twice."""
    stack.worker("w1")
    events = generate(StreamSpec(events=50, duplicate_rate=0, invalid=1, seed=31))
    stack.publish(events)
    assert wait_for(lambda: stack.items_received() == 50, 60)
    replayed = stack.cli("dead-letters", "replay", "--source", "ingest")
    assert "re-published 1 events" in replayed.stdout
    assert wait_for(lambda: stack.items_received() == 51, 60)
    letters = json.loads(stack.cli("dead-letters", "list", "--json").stdout)
    assert [d["count"] for d in letters] == [2]


def test_replay_releases_items_that_gave_up(
    stack: Stack, sandbox: SandboxHandle, tmp_path: Path
) -> None:
    """Items dead-lettered after max attempts are flushed exactly once replayed."""
    sandbox.admin.set_faults(item_error_rate=1.0)
    stack.env["ACCUMSYNC_MAX_ATTEMPTS"] = "1"
    stack.worker("w1")
    events = generate(StreamSpec(events=300, members=10, seed=32))
    stack.publish(events)
    assert wait_for(lambda: stack.items_received() == 300, 60)
    gave_up = stack.cli("flush", "--wait", "--timeout", "60", check=False)
    assert gave_up.returncode == 1 and "dead letters" in gave_up.stdout
    listing = stack.cli("dead-letters", "list", "--json", "--source", "flush", "--limit", "1000")
    letters = json.loads(listing.stdout)
    assert letters and all(d["reason"].startswith("gave up after 1 attempts") for d in letters)
    sandbox.admin.set_faults(item_error_rate=0.0)
    released = stack.cli("dead-letters", "replay", "--source", "flush", "--json")
    assert json.loads(released.stdout) == {
        "republished": 0,
        "released": len(letters),
        "plans": None,
        "refused": [],
    }
    flushed = stack.cli("flush", "--wait", "--timeout", "60", "--json", check=False)
    assert flushed.returncode == 0
    assert json.loads(flushed.stdout) | {"pending": 0, "waited": True} == json.loads(flushed.stdout)
    assert same_totals(remote_totals(sandbox.admin.rows()), expected_totals(events)) == []
