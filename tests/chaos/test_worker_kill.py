"""SIGKILL of worker processes at 20 random moments during ingest and flush, plus failpoints."""

from __future__ import annotations

import os
import re
import signal
import time
from decimal import Decimal
from pathlib import Path

import pytest

from tests.chaos.conftest import Chaos, distinctive
from tests.integration.test_flush import own_keys, plus, vba_rows
from tests.stack import remote_totals
from worker.demo.procs import Child, wait_for
from worker.demo.streams import StreamSpec, generate

pytestmark = pytest.mark.chaos

KILLS = 20
#: Worker "a" also crashes itself now and then at the five named points (pool children die).
FAILPOINTS = (
    "ingest.before_commit@0.03,ingest.after_commit@0.03,fold.before_commit@0.04,"
    "flush.after_intent@0.04,flush.after_put@0.04"
)
RECEIVED = re.compile(r"Task (accumsync\.\w+)\[([0-9a-f-]+)\] received")
DONE = re.compile(r"Task accumsync\.\w+\[([0-9a-f-]+)\] (?:succeeded|retry|raised)")


def in_flight(log: str) -> set[str]:
    """Task names received but not finished in this stretch of a worker's log."""
    done = set(DONE.findall(log))
    return {name for name, tid in RECEIVED.findall(log) if tid not in done}


def some_pool_children(pid: int, timeout: float = 30) -> list[int]:
    """The worker's pool processes, waiting while it re-forks them; read once per try, since
    one may die (a failpoint's self-kill) between two reads."""
    deadline = time.monotonic() + timeout
    while not (kids := pool_children(pid)):
        assert time.monotonic() < deadline, f"worker {pid} has no pool process after {timeout}s"
        time.sleep(0.1)
    return kids


def pool_children(pid: int) -> list[int]:
    """The pids whose parent is ``pid`` (a prefork worker's pool processes)."""
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            kids.append(int(stat.parent.name))
    return kids


def test_twenty_sigkills_during_ingest_and_flush(chaos: Chaos) -> None:
    """Workers SIGKILLed 20 times (and failpoint crashes) mid-work: VBA ends exact, once."""
    sandbox = chaos.vba()
    stack = chaos.stack(ownership="shared")
    events = distinctive(generate(StreamSpec(events=1_500, members=60, seed=74)))
    d21 = Decimal("21.00")  # VBA's own amounts on half the keys: a double count would show
    own = vba_rows(own_keys(events), deductible_Used=d21, ded_PPO_Used=d21)
    sandbox.admin.seed(subscriber=own)
    workers = [
        stack.worker("a", concurrency=2, ACCUMSYNC_FAILPOINT=FAILPOINTS),
        stack.worker("b", concurrency=2),
    ]
    stack.beat()
    waves = [events[i::10] for i in range(10)]
    starts = {w.name: 0 for w in workers}
    hit: dict[str, int] = {"ingest": 0, "flush": 0, "idle": 0}
    kinds: dict[str, int] = {"whole worker (process group)": 0, "one pool process": 0}
    for i in range(KILLS):
        if i % 2 == 0 and waves:
            stack.send(waves.pop(), batch=50)
        time.sleep(chaos.rng.uniform(0.4, 1.2))

        def ready() -> list[Child]:
            return [w for w in workers if " ready." in w.output()[starts[w.name] :]]

        assert wait_for(lambda: bool(ready()), 90)
        victim = chaos.rng.choice(ready())
        busy = in_flight(victim.output()[starts[victim.name] :])
        hit["ingest" if "accumsync.ingest" in busy else "flush" if busy else "idle"] += 1
        if i % 5 == 4:  # every fifth: the whole worker, started again by us
            victim.kill()
            starts[victim.name] = len(victim.output())
            victim.start()
            kinds["whole worker (process group)"] += 1
        else:  # otherwise one pool process, started again by its worker
            os.kill(chaos.rng.choice(some_pool_children(victim.pid)), signal.SIGKILL)
            kinds["one pool process"] += 1
    while waves:
        stack.send(waves.pop(), batch=50)
    chaos.drain(stack, len({e["event_id"] for e in events}), timeout=180)
    logs = stack.logs()
    crashes = logs.count("failpoint.kill")
    points = sorted(set(re.findall(r"failpoint\.kill point=([\w.]+)", logs)))
    assert all(w.alive() for w in workers)
    chaos.finish(
        stack,
        events,
        fault="worker SIGKILL",
        injected="SIGKILL at random moments of a pool process (its worker forks a new one) or "
        "of a whole worker (restarted); failpoint self-kills in pool processes",
        times=KILLS + crashes,
        events_in=len(events),
        expected_plus=lambda expected: plus(remote_totals(own), expected),
        operators=True,  # reconcile's and explain's logs join the leak scan
        extra={
            "sigkills": KILLS,
            "sigkills_by_kind": kinds,
            "sigkills_by_work_in_flight_in_that_worker": hit,
            "tasks_lost_with_their_process": logs.count("Worker exited prematurely"),
            "failpoint_crashes": crashes,
            "failpoints_fired": points,
        },
    )
