"""The whole Postgres server goes away under ingest and flush: a fast restart, then a stop of 30 s
(a private server: the shared cluster other tests use is never touched)."""

from __future__ import annotations

import re
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from tests.chaos.conftest import Chaos, ChaosStack, distinctive, store_away
from tests.chaos.pgserver import PrivatePostgres
from worker.demo.procs import wait_for
from worker.demo.streams import StreamSpec, generate

pytestmark = pytest.mark.chaos

#: (fault, seconds down): ``pg_ctl restart -m fast`` (every session rolled back and cut), then
#: ``pg_ctl stop -m fast``, 30 s with no server at all (events still arriving), and a start.
FAULTS = (("restart", 0.0), ("stop", 30.0))

#: A wave is published in batches of SMALL every GAP seconds (2.5 s for 250 events): the fault,
#: 1.5 s in, finds ingest transactions open as well as flushes.
SMALL, GAP = 10, 0.1


def consumed_again(stack: ChaosStack, probe: dict[str, Any]) -> float:
    """Seconds until a probe event published now is recorded: the workers consume again."""
    before = stack.received()
    stack.send([probe])
    started = time.monotonic()
    assert wait_for(lambda: stack.received() > before, 90, 0.2), stack.logs()[-5000:]
    return round(time.monotonic() - started, 1)


def runs(logs: str, task: str, ended: str) -> int:
    """Runs of ``task`` that ``ended`` so: "succeeded", or "raised unexpected" (Celery's lines)."""
    return len(re.findall(rf"Task accumsync\.{task}\[[^\]]+\] {ended}", logs))


def test_postgres_restart_and_30s_stop_lose_nothing_and_workers_reconnect(chaos: Chaos) -> None:
    """Postgres restarted, later stopped for 30 s, mid-run: workers reconnect, totals exact."""
    pg = PrivatePostgres()
    chaos.exits.callback(pg.close)  # after the stack's processes are gone
    with ThreadPoolExecutor() as pool:  # initdb beside the sandbox's start-up
        initdb = pool.submit(pg.start)
        chaos.vba()
        initdb.result()
    stack = chaos.stack(database_url=pg.url)
    events = distinctive(generate(StreamSpec(events=1_000, members=50, seed=77)))
    waves = [events[i :: len(FAULTS) + 2] for i in range(len(FAULTS) + 2)]
    with ThreadPoolExecutor() as pool:  # the three start-ups overlap: seconds off the run
        starting = [pool.submit(stack.worker, "w1", 2), pool.submit(stack.worker, "w2", 1)]
        beat = pool.submit(stack.beat).result()
        workers = [w.result() for w in starting]
    down, resumed, caught_up, probes = [], [], [], []
    counts: list[dict[str, int]] = [store_away("")]
    for i, (fault, seconds) in enumerate(FAULTS):
        sending = stack.trickle(waves[i], SMALL, GAP)
        time.sleep(1.5)  # mid-ingest, with flushes running
        went = time.monotonic()
        if fault == "restart":
            pg.restart("fast")
        else:
            pg.stop("fast")
            sending.join()
            stack.send(waves[-2], batch=50)  # published while there is no database at all
            time.sleep(max(0.0, seconds - (time.monotonic() - went)))
            pg.start()
        back = time.monotonic()
        down.append(round(back - went, 1))
        sending.join()
        probes.append(dict(waves[i][0], event_id=f"probe-{i}"))
        resumed.append(consumed_again(stack, probes[-1]))
        # Every event published so far is recorded: the batches that failed were retried.
        sent = [*waves[: i + 1], waves[-2] if fault == "stop" else [], probes]
        total = len({e["event_id"] for w in sent for e in w})
        assert wait_for(lambda n=total: stack.received() >= n, 120, 0.2), stack.logs()[-5000:]
        caught_up.append(round(time.monotonic() - back, 1))
        counts.append(store_away(stack.logs()))
    stack.send(waves[-1], batch=50)
    valid = events + probes
    chaos.drain(stack, len({e["event_id"] for e in valid}), timeout=120)
    assert all(w.alive() for w in workers) and beat.alive(), stack.logs()[-8000:]
    logs = stack.logs()
    # A flush that found no store says so in one line: no ERROR with a traceback per pair per
    # tick (36 flush_pair and 28 flush_due tracebacks in a 30 s stop before).
    raised = {t: runs(logs, t, "raised unexpected") for t in ("flush_pair", "flush_due")}
    assert raised == {"flush_pair": 0, "flush_due": 0}, stack.logs()[-5000:]
    # Retried batches did not multiply: one waiting out a countdown longer than the broker's
    # visibility timeout (8 s here) was handed to another worker meanwhile, and each copy retried
    # on its own (35 extra runs of 62 messages before ingest's countdown was capped). A stray copy
    # (a message held past the timeout by a worker on a crowded machine) is harmless: ingest is
    # idempotent, and the totals below are exact either way.
    sizes = [SMALL] * len(FAULTS) + [50, 50]
    messages = sum(-(-len(w) // n) for w, n in zip(waves, sizes, strict=True)) + len(probes)
    succeeded = runs(logs, "ingest", "succeeded")
    assert succeeded - messages <= 3, f"{succeeded} ingest runs succeeded for {messages} messages"
    labels = [f"{f} {s:g}s" if s else f for f, s in FAULTS]
    per_fault = {
        label: {k: after[k] - before[k] for k in after}
        for label, before, after in zip(labels, counts[:-1], counts[1:], strict=True)
    }
    chaos.finish(
        stack,
        valid,
        fault="Postgres server restarted; Postgres server stopped for 30 s",
        injected="private cluster: pg_ctl restart -m fast 1.5 s into a wave of ingest and "
        "flushes; later pg_ctl stop -m fast the same way, 250 more events published while "
        "down, start after 30 s (2 workers, 3 processes, beat)",
        times=len(FAULTS),
        events_in=len(events) + len(probes),
        extra={
            "seconds_server_unavailable": dict(zip(labels, down, strict=True)),
            "seconds_until_consuming_again": dict(zip(labels, resumed, strict=True)),
            "seconds_until_every_sent_event_recorded": dict(zip(labels, caught_up, strict=True)),
            "retries_and_failures_per_fault": per_fault,
            "ingest_messages": messages,
            "ingest_runs_succeeded": succeeded,
            "workers_restarted_by_test": 0,
        }
        | store_away(logs),
    )
