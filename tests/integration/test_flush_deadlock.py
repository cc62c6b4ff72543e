"""The flush's fenced transactions are retried on a deadlock (real Postgres, the sandbox over
HTTP, the real ``Flush`` in this process).

Ingest locks accumulator rows in key order and a flush's finish locks its pair's row, then the
same accumulator rows in whatever order its bulk update reaches them: the two can deadlock,
and Postgres then aborts one of them. Here another transaction takes the two locks in the
opposite order on purpose, so Postgres aborts the flush's finish: it must run again, not fail.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import psycopg
import pytest
from sqlalchemy import text

from tests.integration.test_flush_races import SUB, claim
from worker import db
from worker.demo.procs import wait_for
from worker.demo.sandboxes import SandboxHandle, running_sandbox
from worker.flush.protocol import Flush, FlushReport
from worker.ingest.store import ingest
from worker.settings import get_settings
from worker.store.fold import fold_committed
from worker.vba import VbaClient

pytestmark = pytest.mark.integration


@pytest.fixture
def sandbox() -> Iterator[SandboxHandle]:
    with running_sandbox() as handle:
        yield handle


@pytest.fixture
def store(pg_url: str, sandbox: SandboxHandle, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """This process's settings pointed at a fresh, migrated Postgres store and the sandbox."""
    monkeypatch.setenv("ACCUMSYNC_DATABASE_URL", pg_url)
    monkeypatch.setenv("ACCUMSYNC_REDIS_URL", "")
    for name, value in sandbox.env().items():
        monkeypatch.setenv(name, value)
    get_settings.cache_clear()
    db.reset_engine()
    db.upgrade(pg_url)
    yield pg_url.replace("postgresql+psycopg://", "postgresql://")
    db.engine().dispose()
    db.reset_engine()
    get_settings.cache_clear()


def waiting_on_a_lock(conn: psycopg.Connection[Any], pid: int) -> bool:
    """Whether a backend of this database other than ``pid`` waits on a lock."""
    query = "SELECT 1 FROM pg_stat_activity WHERE pid <> %s AND datname = current_database()"
    return conn.execute(query + " AND wait_event_type = 'Lock'", (pid,)).fetchone() is not None


def deadlocks(conn: psycopg.Connection[Any]) -> int:
    """The deadlocks Postgres detected in this database so far."""
    query = "SELECT deadlocks FROM pg_stat_database WHERE datname = current_database()"
    row = conn.execute(query).fetchone()
    return int(row[0]) if row else 0


def test_a_deadlock_in_the_finish_runs_it_again(
    store: str, sandbox: SandboxHandle, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The flush sends 100 and its finish waits on a row another transaction holds; that one
    then waits on the flush's pair row: Postgres aborts the flush's transaction (it waited
    first). The finish runs again once the other commits: 100 confirmed in one flush. (Before,
    the deadlock failed the flush: the pair backed off with the error, the key unconfirmed.)"""
    with db.session_scope() as s:
        ingest(s, [claim("c1", "100.00")])
    fold_committed()
    with db.session_scope() as s:
        accum_id, pair_id = s.execute(text("SELECT id, pair_id FROM accumulator")).one()
    settings = get_settings()
    monkeypatch.setenv("ACCUMSYNC_FAILPOINT", "flush.after_put:sleep=2")  # PUT done, not recorded
    with psycopg.connect(store, autocommit=False) as other, VbaClient(settings) as vba:
        report: dict[str, FlushReport | BaseException] = {}

        def flush() -> None:
            try:
                report["done"] = Flush(pair_id, vba, settings).run()
            except BaseException as exc:
                report["done"] = exc

        thread = threading.Thread(target=flush)
        thread.start()
        assert wait_for(lambda: any(r["subscriber_ID"] == SUB for r in sandbox.admin.rows()), 30)
        other.execute("SELECT 1 FROM accumulator WHERE id = %s FOR UPDATE", (accum_id,))
        with psycopg.connect(store, autocommit=True) as watch:
            pid = other.info.backend_pid
            assert wait_for(lambda: waiting_on_a_lock(watch, pid), 30, 0.05)
            other.execute("UPDATE pair SET attempts = attempts WHERE id = %s", (pair_id,))
            other.commit()
            thread.join(60)
            assert wait_for(lambda: deadlocks(watch) == 1, 10, 0.2)  # it did deadlock
    done = report["done"]
    assert isinstance(done, FlushReport), repr(done)
    assert (done.calls, done.ok) == (1, 1)
    with db.session_scope() as s:
        row = s.execute(text("SELECT dirty_since, pushed_deductible_total FROM accumulator"))
        assert tuple(row.one()) == (None, 10_000)
    rows = [r for r in sandbox.admin.rows() if r["subscriber_ID"] == SUB]
    assert Decimal(str(rows[0]["deductible_Used"])) == Decimal("100.00")
