"""Metrics scrape: the time to read every figure ``accumsync metrics`` serves, as the audit
tables grow from 10^4 to 10^7 rows each.

``python -m bench.scrape [--sizes 10000,100000,1000000,10000000] [--repeat 5]``: one Postgres
store; at each size, ``ingest_batch`` and ``flush_attempt`` are filled (``generate_series``, in
the same transaction with the counters a worker would have added for them) up to that many
rows, then the scrape (``worker.ops.metrics.snapshot``, what every ``/metrics`` request runs)
is timed, the median of ``--repeat``. The baseline, in the same run: the queries the scrape
used to run (a SUM over ``ingest_batch``, GROUP BYs over ``flush_attempt``, MAX over both),
which read every row. The figures: each size's scrape against the smallest's (flat is ~1.0),
and the old queries' against theirs.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

from sqlalchemy import Engine, text
from sqlmodel import Session

from bench.common import Report, Run, store
from worker.ops.metrics import snapshot
from worker.store import counters

OLD_SCRAPE = [
    "SELECT COALESCE(SUM(received),0), COALESCE(SUM(applied),0), COALESCE(SUM(duplicate),0),"
    " COALESCE(SUM(stale),0), COALESCE(SUM(conflict),0), COALESCE(SUM(invalid),0)"
    " FROM ingest_batch",
    "SELECT statuses, count(*) FROM flush_attempt GROUP BY statuses",
    "SELECT outcome, http_status, count(*) FROM flush_attempt GROUP BY outcome, http_status",
    "SELECT max(started_at) FROM flush_attempt WHERE outcome IN ('ok','partial','recovered')",
    "SELECT max(at) FROM ingest_batch",
]


def fill(engine: Engine, have: int, want: int) -> None:
    """Audit rows ``have + 1 .. want`` in both tables (a day of them per million), and the
    counters a worker would have added for them."""
    n = want - have
    with engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO ingest_batch (at, received, applied, duplicate, stale, conflict,"
                " invalid, duration_ms) SELECT now() - make_interval(secs => g * 0.0864),"
                " 500, 490, 5, 5, 0, 0, 40 FROM generate_series(1, :n) g"
            ),
            {"n": n},
        )
        conn.execute(
            text(
                "INSERT INTO flush_attempt (pair_id, started_at, duration_ms, items, http_status,"
                " statuses, outcome) SELECT g % 5000, now() - make_interval(secs => g * 0.0864),"
                " 30, 2, 207, '{\"200\": 2}', 'ok' FROM generate_series(1, :n) g"
            ),
            {"n": n},
        )
    with Session(engine) as session:
        counted = {"events.received": 500 * n, "events.applied": 490 * n}
        counted |= {"events.duplicate": 5 * n, "events.stale": 5 * n}
        counted |= {"calls.ok.207": n, "items.200": 2 * n}
        counters.add(session, counted)
        session.commit()
    with engine.connect() as conn:
        conn.execute(text("ANALYZE ingest_batch")).close()
        conn.execute(text("ANALYZE flush_attempt")).close()


def timed(work: Callable[[], object], repeat: int) -> float:
    """The median seconds of ``repeat`` runs of ``work`` (after one unmeasured run)."""
    work()
    runs = []
    for _ in range(repeat):
        started = time.perf_counter()
        work()
        runs.append(time.perf_counter() - started)
    return statistics.median(runs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", default="10000,100000,1000000,10000000")
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    sizes = sorted(int(s) for s in args.sizes.split(","))
    report = Report("scrape", vars(args))
    with Run("scrape") as run:
        url = run.database()
        with store(url) as engine:
            have, rows = 0, []
            for size in sizes:
                fill(engine, have, size)
                have = size

                def scrape() -> None:
                    with Session(engine) as session:
                        snapshot(session)

                def old() -> None:
                    with engine.connect() as conn:
                        for sql in OLD_SCRAPE:
                            conn.execute(text(sql)).all()

                rows.append((size, timed(scrape, args.repeat), timed(old, args.repeat)))
    first_new, first_old = rows[0][1], rows[0][2]
    for size, new, old in rows:
        report.row(
            audit_rows_each=f"{size:,}",
            scrape_ms=round(new * 1000, 1),
            scrape_vs_smallest=f"{new / first_new:.2f}",
            old_queries_ms=round(old * 1000, 1),
            old_vs_smallest=f"{old / first_old:.2f}",
        )
    largest = rows[-1][1] / first_new
    report.target(
        "scrape at the largest size / the smallest", round(largest, 2), "<= 2", largest <= 2
    )
    report.note("the scrape reads counters, held items and open dead letters: no audit row")
    report.save()


if __name__ == "__main__":
    main()
