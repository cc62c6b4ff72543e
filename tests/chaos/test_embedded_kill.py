"""SIGKILL of the worker on the embedded defaults (SQLite store, SQLite broker) mid-batch and
mid-flush: VBA ends exact, once, and both SQLite files pass an integrity check."""

from __future__ import annotations

import os
import re
import signal
import sqlite3
import time
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from tests.chaos.conftest import Chaos, ChaosStack, distinctive
from tests.chaos.test_postgres_kill import LEDGER_MISMATCHES
from tests.chaos.test_worker_kill import in_flight, some_pool_children
from tests.integration.test_flush import own_keys, plus, vba_rows
from tests.stack import remote_totals
from worker.demo.procs import Child
from worker.demo.streams import StreamSpec, generate

pytestmark = pytest.mark.chaos

#: The kills, in order: the whole worker (its process group, then started again) or its one pool
#: process (which the worker forks again), each aimed at a moment that work of a kind is in flight.
#: A pool process killed stalls a one-process worker for Celery's worker_lost_wait (10 s) before
#: its task is given back: the kill after each of them lands in that stall ("stall"), with the
#: dead process's message still held by the worker.
KILLS = [
    ("whole worker", "ingest"),
    ("whole worker", "flush"),
    ("pool process", "ingest"),
    ("whole worker", "stall"),
    ("whole worker", "ingest"),
    ("pool process", "flush"),
    ("whole worker", "stall"),
]
STALLED = "stalled: its pool process killed, the task not yet given back"
#: The pool process pauses now and then inside a batch's open transaction (the store's write lock
#: held) and right after a PUT that VBA answered (nothing recorded yet): the kills aim there. The
#: worker started after the last kill runs without them.
FAILPOINTS = "ingest.before_commit:sleep=0.4@0.3,flush.after_put:sleep=0.4@0.25"
PAUSED = {"ingest": "point=ingest.before_commit", "flush": "point=flush.after_put"}


def aim(worker: Child, since: int, mark: int, want: str, timeout: float = 4.0) -> str:
    """Wait (briefly) for a moment with ``want`` in flight: best a failpoint pause after offset
    ``mark`` of the log, else a task received and not finished since offset ``since``; returns
    what was in flight when it found one or gave up."""
    deadline = time.monotonic() + timeout
    if want == "stall":
        lost = "Worker exited prematurely" in worker.output()[mark:]
        return STALLED if not lost else aim(worker, since, len(worker.output()), "ingest", timeout)
    while True:
        log = worker.output()
        if PAUSED[want] in log[mark:]:
            return f"{want}, paused at its failpoint"
        busy = in_flight(log[since:])
        kind = "ingest" if "accumsync.ingest" in busy else "flush" if busy else "idle"
        if time.monotonic() > deadline:
            return f"{kind}, running" if busy else kind
        time.sleep(0.005)


def checks(path: Path) -> dict[str, Any]:
    """``PRAGMA integrity_check`` and ``foreign_key_check`` of one SQLite file."""
    with sqlite3.connect(path) as db:
        integrity = [r[0] for r in db.execute("PRAGMA integrity_check")]
        foreign = db.execute("PRAGMA foreign_key_check").fetchall()
    return {"integrity_check": integrity, "foreign_key_violations": len(foreign)}


def broker_rows(path: Path) -> dict[str, int]:
    """Messages left in the embedded broker's table, by visibility."""
    with sqlite3.connect(path) as db:
        rows = db.execute("SELECT visible, count(*) FROM kombu_message GROUP BY visible")
        return {("waiting" if v else "taken"): n for v, n in rows}


def test_sigkills_on_embedded_store_and_broker(chaos: Chaos) -> None:
    """The embedded worker SIGKILLed 7 times mid-batch and mid-flush: nothing lost or doubled."""
    sandbox = chaos.vba()
    # Leases of 3 s: a killed worker's message is back within seconds (tasks take under 1 s).
    stack: ChaosStack = chaos.stack(
        embedded=True, ownership="shared", broker_visibility_timeout="3"
    )
    home = Path(stack.env["ACCUMSYNC_HOME"])
    events = distinctive(generate(StreamSpec(events=600, members=20, seed=75)))
    d17 = Decimal("17.00")  # VBA's own amounts on half the keys: a doubled delta would show
    own = vba_rows(own_keys(events), deductible_Used=d17, ded_PPO_Used=d17)
    sandbox.admin.seed(subscriber=own)
    # One worker process, as docs/operations.md says for the embedded defaults.
    worker = stack.worker("w", concurrency=1, ACCUMSYNC_FAILPOINT=FAILPOINTS)
    stack.beat()
    sends = sum(want == "ingest" for _, want in KILLS)  # a wave before each kill aimed at ingest
    waves = [events[i::sends] for i in range(sends)]
    since = 0
    kinds = {"whole worker (process group)": 0, "one pool process": 0}
    hit: dict[str, int] = {}
    restarts: list[float] = []
    mark = 0
    for n, (kind, want) in enumerate(KILLS, 1):
        if want != "stall":  # a stall is judged from the pool kill on
            mark = len(worker.output())
        if want == "ingest":
            stack.send(waves.pop(), batch=25)
        time.sleep(chaos.rng.uniform(0.0, 0.3))
        moment = aim(worker, since, mark, want)
        hit[moment] = hit.get(moment, 0) + 1
        last_kill = time.monotonic()
        if kind == "whole worker":
            worker.kill()
            since = len(worker.output())
            if n == len(KILLS):
                worker.env.pop("ACCUMSYNC_FAILPOINT")
            started = time.monotonic()
            worker.start().ready(" ready.", timeout=90, after=since)  # the store and broker
            # files were last opened by a SIGKILLed process: a restart must open them as they are
            restarts.append(time.monotonic() - started)
            kinds["whole worker (process group)"] += 1
        else:
            os.kill(chaos.rng.choice(some_pool_children(worker.pid)), signal.SIGKILL)
            kinds["one pool process"] += 1
    chaos.drain(stack, len({e["event_id"] for e in events}), timeout=120)
    confirmed_after = round(time.monotonic() - last_kill, 1)
    assert worker.alive()
    mismatches = stack.scalar(LEDGER_MISMATCHES)  # totals that are not the sum of their claims
    assert mismatches == 0
    logs = stack.logs()
    for child in stack.children:  # quiet files for the checks: a warm stop, no SIGKILL
        child.stop()
    store, broker = checks(home / "accumsync.db"), checks(home / "broker.db")
    assert store == broker == {"integrity_check": ["ok"], "foreign_key_violations": 0}
    chaos.finish(
        stack,
        events,
        fault="worker SIGKILL on the embedded defaults",
        injected="SIGKILL of the one worker (process group, restarted) or of its pool process, "
        "aimed at a batch's open transaction or a flush between PUT and bookkeeping; SQLite "
        "store and SQLite broker",
        times=len(KILLS),
        events_in=len(events),
        expected_plus=lambda expected: plus(remote_totals(own), expected),
        extra={
            "sigkills_by_kind": kinds,
            "sigkills_by_work_in_flight": hit,
            "seconds_to_restart_worker": [round(r, 1) for r in restarts],
            "messages_back_after_lease": sum(
                int(n) for n in re.findall(r"broker\.redelivered messages=(\d+)", logs)
            ),
            "seconds_from_last_kill_to_all_confirmed": confirmed_after,
            "store_db": store | {"accumulators_not_the_sum_of_their_claims": mismatches},
            "broker_db": broker,
            "broker_messages_left": broker_rows(home / "broker.db"),
            "database_is_locked_lines": logs.count("database is locked"),
        },
    )
