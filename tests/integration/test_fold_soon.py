"""A worker process's fold, soon after its batches (worker/store/fold.py, ``Soon``), on Postgres.

Batches that ask within the delay are folded by one fold; a batch committed while that fold
runs, after it looked, is folded by the next one, never left waiting; a process about to exit
folds what it holds, after a fold under way has ended.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
from sqlalchemy import Engine
from sqlmodel import Session

from worker.demo.procs import wait_for
from worker.demo.streams import StreamSpec, generate
from worker.ingest.store import ingest
from worker.store.fold import FoldReport, Soon, fold_committed, in_session_of, unfolded

pytestmark = pytest.mark.integration

EVENTS = generate(StreamSpec(events=400, members=80, seed=9))


def record(engine: Engine, events: list[Any]) -> None:
    with Session(engine) as session:
        ingest(session, events)
        session.commit()


def waiting(engine: Engine) -> int:
    """Batches recorded and not folded yet."""
    with Session(engine) as session:
        return unfolded(session)


def test_batches_asking_within_the_delay_are_folded_by_one_fold(pg_engine: Engine) -> None:
    """Three batches ask within a delay of a minute: nothing is folded until the process folds
    (here ``now``, as at its exit), and then one fold takes all three."""
    folds: list[FoldReport] = []

    def run() -> FoldReport:
        folds.append(fold_committed(in_session_of(pg_engine)))
        return folds[-1]

    soon = Soon(delay=60, run=run)
    for start in range(0, 300, 100):
        record(pg_engine, EVENTS[start : start + 100])
        soon.ask()
    assert waiting(pg_engine) == 3
    soon.now()
    assert [f.batches for f in folds] == [3]
    assert waiting(pg_engine) == 0


def test_a_batch_committed_during_a_fold_is_folded_by_the_next(pg_engine: Engine) -> None:
    """The first fold looks, folds and commits; a batch is committed and asks just after its
    look (here, inside ``run``, after the fold returned): a second fold takes it."""
    folds: list[FoldReport] = []

    def run() -> FoldReport:
        folds.append(fold_committed(in_session_of(pg_engine)))
        if len(folds) == 1:
            record(pg_engine, EVENTS[100:200])
            soon.ask()
        return folds[-1]

    soon = Soon(delay=0.05, run=run)
    record(pg_engine, EVENTS[:100])
    soon.ask()
    assert wait_for(lambda: len(folds) == 2, 30, 0.02), folds
    assert [f.batches for f in folds] == [1, 1]
    assert waiting(pg_engine) == 0


def test_now_waits_for_a_fold_under_way(pg_engine: Engine) -> None:
    """A process about to exit calls ``now`` while its timer's fold runs: ``now`` returns once
    that fold has committed, not before (the thread would die with the process, its fold rolled
    back). When ``now`` left a fold under way to itself this printed ``assert [] == [1]``."""
    started, done = threading.Event(), []

    def run() -> FoldReport:
        started.set()
        time.sleep(0.5)  # the fold is under way when the process is told to stop
        report = fold_committed(in_session_of(pg_engine))
        done.append(report.batches)
        return report

    soon = Soon(delay=0, run=run)
    record(pg_engine, EVENTS[:100])
    soon.ask()
    assert started.wait(30)
    soon.now()
    assert done == [1]
    assert waiting(pg_engine) == 0
