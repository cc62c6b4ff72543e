"""Flush throughput: dirty pairs flushed to the sandbox at VBA's rate limit, without a 429.

``python -m bench.flush [--pairs 5000]``: the store is seeded with ``--pairs`` dirty
(subscriber, group) pairs of two accumulators each (in-process ingest, not timed), then one
``accumsync.flush_due`` fans out a flush_pair task per pair to ``celery -A worker worker -c 4``
(exclusive ownership: no reads, one batch PUT per pair) against a sandbox enforcing 25 req/s,
burst 50. The baseline is the limit itself: achieved calls/s divided by 25.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

from sqlalchemy import text
from sqlmodel import Session

from bench.common import Report, Run, producer_app, store, wait_until
from worker.sandbox.testing import running_sandbox

RATE, BURST = 25.0, 50


def seed(url: str, pairs: int) -> None:
    """``pairs`` dirty pairs, two keys each, written with the real ingest."""
    from worker.store import ingest

    events = [event(i, code) for i in range(pairs) for code in ("DED", "OOP")]
    with store(url) as engine, Session(engine) as session:
        for start in range(0, len(events), 500):
            ingest(session, events[start : start + 500])
        session.commit()


def event(i: int, code: str) -> dict[str, Any]:
    return {
        "event_id": f"evt-{i}-{code}",
        "claim_id": f"clm-{i}-{code}",
        "version": 0,
        "status": "adjudicated",
        "subscriber_id": f"S{i:07d}",
        "group_id": f"GRP{i % 5:03d}",
        "plan_year": "2026",
        "plan_type": "MED",
        "benefit_code": code,
        "network": "in",
        "amounts": {"allowed": "120.00", "deductible": "20.00", "copay": "5.00"},
    }


def dirty(url: str) -> int:
    sql = text(
        "SELECT count(*) FROM accumulator"
        " WHERE dirty_since IS NOT NULL OR intent_target IS NOT NULL"
    )
    with store(url) as engine, engine.connect() as conn:
        return int(conn.execute(sql).scalar())


def call_window(url: str) -> tuple[float, int]:
    """(seconds from the first batch call's start to the last one's end, number of calls)."""
    sql = text(
        "SELECT extract(epoch FROM max(started_at + duration_ms * interval '1 millisecond')"
        " - min(started_at)), count(*) FROM flush_attempt WHERE pair_id IS NOT NULL"
    )
    with store(url) as engine, engine.connect() as conn:
        seconds, calls = conn.execute(sql).one()
    return float(seconds), int(calls)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--pairs", type=int, default=5_000)
    parser.add_argument("--processes", type=int, default=4)
    args = parser.parse_args()
    report = Report("flush", vars(args) | {"rate": RATE, "burst": BURST})

    with Run("flush") as run, running_sandbox(rate=RATE, burst=BURST) as sandbox:
        url = run.database()
        seed(url, args.pairs)
        vba = {k: v for k, v in sandbox.env().items() if k.startswith("ACCUMSYNC_VBA_")}
        env = run.env(url, **{"ownership": "exclusive", "flush_interval": "3600"}) | vba
        run.worker(env, args.processes, name="flush")
        app = producer_app(env)
        sandbox.admin.reset()
        started = time.time()
        app.send_task("accumsync.flush_due", argsrepr="()")
        timeout = args.pairs / RATE * 3 + 120
        wait_until(lambda: dirty(url) == 0, timeout, interval=0.5, what="every pair flushed")
        elapsed = time.time() - started
        window, attempts = call_window(url)
        counters = sandbox.admin.counters()

    routes = counters["by_route"]
    calls = sum(routes.get("accumulators.batch", {}).values())
    throttled = int(counters["by_status"].get("429", 0))
    rate = calls / window
    per_pair = calls / args.pairs
    report.row(
        pairs=args.pairs,
        processes=args.processes,
        batch_calls=calls,
        seconds_first_to_last_call=round(window, 1),
        calls_per_s=round(rate, 2),
        vs_limit=f"{rate / RATE:.2f}",
        end_to_end_s=round(elapsed, 1),
        sandbox_429s=throttled,
        calls_per_pair=round(per_pair, 3),
    )
    report.target("calls/s / 25", round(rate / RATE, 3), ">= 0.9", rate / RATE >= 0.9)
    report.target("sandbox 429s", throttled, "0", throttled == 0)
    report.target("batch calls per dirty pair", round(per_pair, 3), "1.0", per_pair == 1.0)
    report.note(f"flush_attempt rows: {attempts}; sandbox requests by route: {routes}")
    report.note(
        f"the first {BURST} calls ride the burst; the steady state cannot exceed {RATE:.0f}/s"
    )
    report.save()


if __name__ == "__main__":
    main()
