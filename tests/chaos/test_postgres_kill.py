"""Postgres connections terminated mid-transaction (pg_terminate_backend) under ingest and flush."""

from __future__ import annotations

import threading
import time

import psycopg
import pytest
from sqlalchemy.engine import make_url

from models.buckets import AMOUNTS
from tests.chaos.conftest import Chaos, distinctive
from tests.services import PG_ADMIN
from worker.demo.streams import StreamSpec, generate

pytestmark = pytest.mark.chaos

#: Terminate only backends of this test's own database that are inside a transaction.
IN_TRANSACTION = """
SELECT pid, pg_terminate_backend(pid) FROM pg_stat_activity
WHERE datname = %s AND pid <> pg_backend_pid() AND xact_start IS NOT NULL
  AND state IN ('active', 'idle in transaction')
"""


#: Accumulators whose totals differ from the sum of their claims' current contributions.
LEDGER_MISMATCHES = (
    "SELECT count(*) FROM (SELECT a.id FROM accumulator a LEFT JOIN claim c ON "
    "(c.subscriber_id, c.group_id, c.plan_year, c.plan_type, c.benefit_code) = "
    "(a.subscriber_id, a.group_id, a.plan_year, a.plan_type, a.benefit_code) GROUP BY a.id HAVING "
    + " OR ".join(f"max(a.{n}_total) <> coalesce(sum(c.{n}_cents), 0)" for n in AMOUNTS)
    + ") AS x"
)


class Terminator:
    """Every ``every`` seconds, terminate the database's backends that are mid-transaction."""

    def __init__(self, database: str, every: float) -> None:
        self.database, self.every = database, every
        self.killed = 0
        self.rounds = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> Terminator:
        self._thread.start()
        return self

    def _run(self) -> None:
        with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
            while not self._stop.wait(self.every):
                self.killed += len(conn.execute(IN_TRANSACTION, (self.database,)).fetchall())
                self.rounds += 1

    def stop(self) -> int:
        self._stop.set()
        self._thread.join(10)
        return self.killed


def test_terminated_connections_retry_batches_without_partial_application(chaos: Chaos) -> None:
    """Backends killed mid-transaction for 15 s: batches retried, nothing half-applied, exact."""
    chaos.vba()
    stack = chaos.stack()
    database = make_url(chaos.pg_url).database
    assert database and database.startswith("acc_")  # the test's own database, nobody else's
    events = distinctive(generate(StreamSpec(events=2_000, members=60, seed=76)))
    stack.worker("w1", concurrency=2)
    stack.worker("w2", concurrency=1)
    stack.beat()
    # A batch of 250 is in its transaction for ~40 ms: polls every 20 ms catch several. (At
    # every 0.25 s and batches of 125, ingest became fast enough to slip through all of them.)
    killer = Terminator(database, every=0.02).start()
    for i in range(6):  # 15 s of intake and flushes under fire
        stack.send(events[i::6], batch=250)
        time.sleep(2.5)
    killed = killer.stop()
    chaos.drain(stack, len({e["event_id"] for e in events}), timeout=120)
    logs = stack.logs()
    retried = logs.count("ingest.db_unavailable")
    assert killed > 0 and retried > 0
    # No partial application: the ledger's accumulators are exactly the sum of its claims.
    assert stack.scalar(LEDGER_MISMATCHES) == 0
    chaos.finish(
        stack,
        events,
        fault="Postgres connections killed mid-transaction",
        injected="pg_terminate_backend every 0.02 s for 15 s on the test database's backends "
        "inside a transaction (2 workers, 3 processes, beat)",
        times=killed,
        events_in=len(events),
        extra={
            "backends_terminated": killed,
            "ingest_batches_retried": retried,
            "flush_tasks_failed_and_requeued": logs.count("raised unexpected"),
        },
    )
