"""Ctrl-C in the middle of a store round trip is an interruption, never "cannot reach the store".

A SIGINT that lands while SQLAlchemy pre-pings a pooled psycopg connection leaves the connection
busy (transaction status ACTIVE), and the ping's cleanup raises "can't change 'autocommit' now"
over the ``KeyboardInterrupt``. The command line read that as a store it could not reach (exit 4)
and an operator who pressed Ctrl-C on ``reconcile`` was told to check the database."""

from __future__ import annotations

import os
import random
import signal
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine, text
from sqlalchemy.exc import DBAPIError

from worker import db
from worker.problems import interrupted, problem_of
from worker.settings import get_settings

pytestmark = pytest.mark.integration


@pytest.fixture
def store(pg_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """``worker.db`` and the settings pointed at a fresh Postgres database."""
    monkeypatch.setenv("ACCUMSYNC_DATABASE_URL", pg_url)
    monkeypatch.setenv("ACCUMSYNC_HOME", str(tmp_path))
    get_settings.cache_clear()
    db.reset_engine()
    yield pg_url
    db.engine().dispose()
    db.reset_engine()
    get_settings.cache_clear()


def test_the_pre_pings_error_over_ctrl_c_is_an_interruption(store: str) -> None:
    """The exact chain, made without a timing race: a pooled connection left mid-query, as the
    signal leaves it, then checked out while the ``KeyboardInterrupt`` is being handled."""
    engine = db.engine()
    pooled = engine.raw_connection()
    driver = pooled.driver_connection
    pooled.close()  # back to the pool, idle
    driver.pgconn.send_query(b"select pg_sleep(0.2)")  # the round trip a signal cut short
    with pytest.raises(DBAPIError) as caught:
        _check_out_while_interrupted(engine)
    assert "can't change 'autocommit' now" in str(caught.value)
    assert interrupted(caught.value)
    assert problem_of(caught.value) is None, problem_of(caught.value)


def _check_out_while_interrupted(engine: Engine) -> None:
    try:
        raise KeyboardInterrupt
    except KeyboardInterrupt:
        with engine.connect():  # the pool pre-pings the busy connection
            pass


def test_every_ctrl_c_during_store_work_reads_as_an_interruption(store: str) -> None:
    """Real signals at random moments of short transactions: each outcome is an interruption,
    whichever of the driver's errors it surfaced as."""
    outcomes: list[BaseException] = []
    while len(outcomes) < 400 and sum(isinstance(e, DBAPIError) for e in outcomes) < 3:
        outcomes.append(_interrupted_transactions())
    print(Counter(type(e).__name__ for e in outcomes))
    for exc in outcomes:
        assert interrupted(exc), repr(exc)
        assert problem_of(exc) is None, problem_of(exc)


def _interrupted_transactions() -> BaseException:
    """What short transactions, one after another, raise when a SIGINT lands among them.

    The one signal lands inside the outer ``try`` whenever it comes: the timer starts inside
    it, and it is joined inside it. (Started before it and joined in a ``finally``, a signal
    that came early on a busy machine, or after an error of another kind ended the loop, was
    raised outside and stopped the whole test process: pytest-xdist's "node down:
    keyboard-interrupt" in a fresh-clone CI.)"""
    timer = threading.Timer(random.uniform(0.001, 0.02), os.kill, (os.getpid(), signal.SIGINT))
    outcome: BaseException | None = None
    try:
        try:
            timer.start()
            while True:
                with db.session_scope() as session:
                    session.execute(text("select 1"))
        except (KeyboardInterrupt, Exception) as exc:
            outcome = exc
        timer.join()
    except KeyboardInterrupt as late:  # the signal after the loop ended another way
        outcome = outcome or late
    assert outcome is not None
    return outcome
