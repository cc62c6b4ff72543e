"""Flush throughput at VBA's rate limit, and the read-to-write window of shared ownership.

``python -m bench.flush [--pairs 5000] [--shared-pairs 1000]``: the store is seeded with dirty
(subscriber, group) pairs of two accumulators each (in-process ingest, not timed), then one
``accumsync.flush_due`` fans out a flush_pair task per pair to ``celery -A worker worker -c 4``
against a sandbox enforcing 25 req/s, burst 50. Two phases:

- exclusive ownership (``--pairs``): no reads, one batch PUT per pair. Baseline: the limit
  itself, achieved calls/s divided by 25.
- shared ownership (``--shared-pairs``): each pair's rows are read right before its PUT; a VBA
  write landing between the two is overwritten (the API has no conditional write), so the
  window is measured: ``flush_attempt.read_to_put_ms``, from VBA's answer to our read until the
  PUT leaves (its intent recorded, its rate-limit token taken). Baseline: one token period of
  the shared bucket (40 ms at 25/s), the least a second call must wait at the limit.
"""

from __future__ import annotations

import argparse
import math
import time
from typing import Any

from sqlalchemy import text
from sqlmodel import Session

from bench.common import Report, Run, producer_app, store, wait_until
from worker.demo.sandboxes import running_sandbox

RATE, BURST = 25.0, 50


def seed(url: str, pairs: int) -> None:
    """``pairs`` dirty pairs, two keys each, written with the real ingest."""
    from worker.ingest.store import ingest

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


def phase(ownership: str, pairs: int, processes: int) -> dict[str, Any]:
    """Seed ``pairs`` dirty pairs, flush them all, and read the figures."""
    with Run(f"flush-{ownership}") as run, running_sandbox(rate=RATE, burst=BURST) as sandbox:
        url = run.database()
        seed(url, pairs)
        vba = {k: v for k, v in sandbox.env().items() if k.startswith("ACCUMSYNC_VBA_")}
        env = run.env(url, **{"ownership": ownership, "flush_interval": "3600"}) | vba
        run.worker(env, processes, name="flush")
        app = producer_app(env)
        sandbox.admin.reset()
        started = time.time()
        app.send_task("accumsync.flush_due", argsrepr="()")
        timeout = pairs / RATE * 3 * (2 if ownership == "shared" else 1) + 120
        wait_until(lambda: dirty(url) == 0, timeout, interval=0.5, what="every pair flushed")
        elapsed = time.time() - started
        window, attempts = call_window(url)
        counters = sandbox.admin.counters()
        windows = read_to_put(url)
    routes = counters["by_route"]
    return {
        "calls": sum(routes.get("accumulators.batch", {}).values()),
        "reads": sum(routes.get("accumulators.list", {}).values()),
        "throttled": int(counters["by_status"].get("429", 0)),
        "window": window,
        "attempts": attempts,
        "elapsed": elapsed,
        "routes": routes,
        "read_to_put_ms": windows,
    }


def read_to_put(url: str) -> list[int]:
    """Every batch call's read-to-write window (ms), sorted."""
    sql = text(
        "SELECT read_to_put_ms FROM flush_attempt WHERE read_to_put_ms IS NOT NULL ORDER BY 1"
    )
    with store(url) as engine, engine.connect() as conn:
        return [int(v) for v in conn.execute(sql).scalars()]


def percentile(sorted_values: list[int], share: float) -> int:
    """The nearest-rank percentile of an ascending list."""
    if not sorted_values:
        return 0
    rank = max(1, math.ceil(share * len(sorted_values)))
    return sorted_values[rank - 1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--pairs", type=int, default=5_000)
    parser.add_argument("--shared-pairs", type=int, default=1_000)
    parser.add_argument("--processes", type=int, default=4)
    args = parser.parse_args()
    report = Report("flush", vars(args) | {"rate": RATE, "burst": BURST})
    for ownership, pairs in (("exclusive", args.pairs), ("shared", args.shared_pairs)):
        if pairs:
            figures(report, ownership, pairs, args.processes)
    report.note(
        f"the first {BURST} calls ride the burst; the steady state cannot exceed {RATE:.0f}/s"
    )
    report.save()


def figures(report: Report, ownership: str, pairs: int, processes: int) -> None:
    """One phase's row, targets and notes."""
    got = phase(ownership, pairs, processes)
    calls, reads, throttled = got["calls"], got["reads"], got["throttled"]
    rate = (calls + reads) / got["window"]
    per_pair = calls / pairs
    windows = got["read_to_put_ms"]
    p50, p99 = percentile(windows, 0.5), percentile(windows, 0.99)
    report.row(
        ownership=ownership,
        pairs=pairs,
        processes=processes,
        batch_calls=calls,
        list_reads=reads,
        seconds_first_to_last_call=round(got["window"], 1),
        vba_calls_per_s=round(rate, 2),
        vs_limit=f"{rate / RATE:.2f}",
        end_to_end_s=round(got["elapsed"], 1),
        sandbox_429s=throttled,
        calls_per_pair=round(per_pair, 3),
        read_to_put_p50_ms=p50 if windows else "",
        read_to_put_p99_ms=p99 if windows else "",
        read_to_put_max_ms=windows[-1] if windows else "",
    )
    report.target(
        f"{ownership}: VBA calls/s / 25", round(rate / RATE, 3), ">= 0.9", rate / RATE >= 0.9
    )
    report.target(f"{ownership}: sandbox 429s", throttled, "0", throttled == 0)
    report.target(
        f"{ownership}: batch calls per dirty pair", round(per_pair, 3), "1.0", per_pair == 1.0
    )
    if windows:
        period = 1000 / RATE
        report.note(
            f"shared: read-to-write window p50 {p50} ms ({p50 / period:.1f} token periods of "
            f"{period:.0f} ms), p99 {p99} ms, max {windows[-1]} ms over {len(windows)} batch calls"
        )
    report.note(
        f"{ownership}: flush_attempt rows {got['attempts']}; requests by route {got['routes']}"
    )


if __name__ == "__main__":
    main()
