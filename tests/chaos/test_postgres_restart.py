"""The whole Postgres server goes away under ingest and flush: a fast restart, then a stop of 30 s
(a private server: the shared cluster other tests use is never touched)."""

from __future__ import annotations

import re
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.chaos.conftest import Chaos, ChaosStack, distinctive
from tests.chaos.pgserver import PrivatePostgres
from worker.demo.procs import wait_for
from worker.demo.streams import StreamSpec, generate

pytestmark = pytest.mark.chaos

#: (fault, seconds down): ``pg_ctl restart -m fast`` (every session rolled back and cut), then
#: ``pg_ctl stop -m fast``, 30 s with no server at all (events still arriving), and a start.
FAULTS = (("restart", 0.0), ("stop", 30.0))


def consumed_again(stack: ChaosStack, probe: dict[str, object]) -> float:
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
    chaos.vba()
    pg = PrivatePostgres().start()
    chaos.exits.callback(pg.close)  # after the stack's processes are gone
    stack = chaos.stack(database_url=pg.url)
    events = distinctive(generate(StreamSpec(events=1_000, members=50, seed=77)))
    waves = [events[i :: len(FAULTS) + 2] for i in range(len(FAULTS) + 2)]
    with ThreadPoolExecutor() as pool:  # the three start-ups overlap: seconds off the run
        starting = [pool.submit(stack.worker, "w1", 2), pool.submit(stack.worker, "w2", 1)]
        beat = pool.submit(stack.beat).result()
        workers = [w.result() for w in starting]
    resumed, caught_up, down, probes = [], [], [], []
    for i, (fault, seconds) in enumerate(FAULTS):
        stack.send(waves[i], batch=50)
        time.sleep(1.5)  # mid-ingest, with flushes starting
        went = time.monotonic()
        if fault == "restart":
            pg.restart("fast")
        else:
            pg.stop("fast")
            stack.send(waves[-2], batch=50)  # published while there is no database at all
            time.sleep(seconds)
            pg.start()
        back = time.monotonic()
        down.append(round(back - went, 1))
        probe = dict(waves[i][0], event_id=f"probe-{i}")
        probes.append(probe)
        resumed.append(consumed_again(stack, probe))
        # Every event published so far recorded: the batches that failed were retried.
        sent = len({e["event_id"] for w in [*waves[: i + 1], waves[-2] if i else []] for e in w})
        sent += len(probes)
        assert wait_for(lambda n=sent: stack.received() >= n, 120, 0.2), stack.logs()[-5000:]
        caught_up.append(round(time.monotonic() - back, 1))
    stack.send(waves[-1], batch=50)
    valid = events + probes
    chaos.drain(stack, len({e["event_id"] for e in valid}), timeout=120)
    assert all(w.alive() for w in workers) and beat.alive(), stack.logs()[-8000:]
    logs = stack.logs()
    # Each ingest message ran to success once: a retried batch waiting for its countdown was not
    # also delivered again by the broker (a copy per visibility timeout, each retrying on its own).
    messages = sum(-(-len(w) // 50) for w in waves) + len(probes)
    succeeded = runs(logs, "ingest", "succeeded")
    assert succeeded == messages, f"{succeeded} ingest runs succeeded for {messages} messages"
    labels = [f"{f} {s:g}s" if s else f for f, s in FAULTS]
    chaos.finish(
        stack,
        valid,
        fault="Postgres server restarted; Postgres server stopped for 30 s",
        injected="private cluster: pg_ctl restart -m fast 1.5 s into a wave of ingest and "
        "flushes; later pg_ctl stop -m fast, 250 more events published while down, start "
        "after 30 s (2 workers, 3 processes, beat)",
        times=len(FAULTS),
        events_in=len(events) + len(probes),
        extra={
            "seconds_server_unavailable": dict(zip(labels, down, strict=True)),
            "seconds_until_consuming_again": dict(zip(labels, resumed, strict=True)),
            "seconds_until_every_sent_event_recorded": dict(zip(labels, caught_up, strict=True)),
            "ingest_retries": logs.count("ingest.db_unavailable"),
            "ingest_messages": messages,
            "ingest_runs_succeeded": succeeded,
            "flush_pair_failed": runs(logs, "flush_pair", "raised unexpected"),
            "flush_due_failed": runs(logs, "flush_due", "raised unexpected"),
            "workers_restarted_by_test": 0,
        },
    )
