"""Flush throughput at VBA's rate limit, and the read-to-write window of shared ownership.

``python -m bench.flush [--pairs 5000] [--shared-pairs 1000] [--embedded-pairs 1000]``: the
store is seeded with dirty (subscriber, group) pairs of two accumulators each (in-process ingest,
not timed), then one ``accumsync.flush_due`` fans out a flush_pair task per pair to
``celery -A worker worker -c 4`` against a sandbox enforcing 25 req/s, burst 50. Three phases:

- exclusive ownership (``--pairs``): no reads, one batch PUT per pair. Baseline: the limit
  itself, achieved calls/s divided by 25.
- shared ownership (``--shared-pairs``): each pair's rows are read right before its PUT; a VBA
  write landing between the two is overwritten (the API has no conditional write), so the
  window is measured: ``flush_attempt.read_to_put_ms``, from VBA's answer to our read until the
  PUT leaves (its intent recorded, its rate-limit token taken). Baseline: one token period of
  the shared bucket (40 ms at 25/s), the least a second call must wait at the limit.
- embedded (``--embedded-pairs``): the defaults, as ``accumsync demo`` runs them: SQLite store,
  kombu's SQLite broker, one worker process (``-c 1``: one token, one in-process rate-limit
  bucket, one writer), exclusive ownership. Baseline: the limit.

Each phase reads the CPU seconds its parts used from ``/proc``, from the fan-out until the last
pair is clean: the worker's pool and main process, the sandbox process, and every Postgres and
Redis process (not in the embedded phase, which uses neither), per flushed pair.
"""

from __future__ import annotations

import argparse
import math
import time
from typing import Any

from sqlalchemy import Engine, select, text
from sqlmodel import Session

from bench.common import CpuMeter, Report, Run, producer_app, store, wait_until
from worker.demo.sandboxes import running_sandbox
from worker.store.tables import T_ATTEMPT

RATE, BURST = 25.0, 50


def seed(url: str, pairs: int, first: int = 0) -> None:
    """``pairs`` dirty pairs, two keys each, written with the real ingest; subscribers
    ``S{first:07d}`` onwards."""
    from worker.ingest.store import ingest

    events = [event(i, code) for i in range(first, first + pairs) for code in ("DED", "OOP")]
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


DIRTY = text(
    "SELECT count(*) FROM accumulator WHERE (dirty_since IS NOT NULL OR intent_target IS NOT NULL)"
)


def dirty(engine: Engine, below_pair: int | None = None) -> int:
    """Accumulators waiting for a flush (of pairs with ids up to ``below_pair``, if given)."""
    sql = DIRTY if below_pair is None else text(f"{DIRTY.text} AND pair_id <= {int(below_pair)}")
    with engine.connect() as conn:
        return int(conn.execute(sql).scalar() or 0)


def call_window(engine: Engine) -> tuple[float, int]:
    """(seconds from the first batch call's start to the last one's end, number of calls).

    Read as rows and computed here, so it is the same on Postgres and SQLite."""
    f = T_ATTEMPT.c
    sql = select(f.started_at, f.duration_ms).where(f.pair_id.is_not(None))
    with engine.connect() as conn:
        rows = conn.execute(sql).all()
    if not rows:
        return 0.0, 0
    first = min(r.started_at for r in rows).timestamp()
    last = max(r.started_at.timestamp() + r.duration_ms / 1000 for r in rows)
    return last - first, len(rows)


def phase(ownership: str, pairs: int, processes: int, embedded: bool = False) -> dict[str, Any]:
    """Seed ``pairs`` dirty pairs, flush them all, and read the figures."""
    name = "embedded" if embedded else ownership
    with Run(f"flush-{name}") as run, running_sandbox(rate=RATE, burst=BURST) as sandbox:
        broker = None
        if embedded:
            url, broker = run.sqlite()
        else:
            url = run.database()
        seed(url, pairs)
        vba = {k: v for k, v in sandbox.env().items() if k.startswith("ACCUMSYNC_VBA_")}
        env = run.env(url, broker, **{"ownership": ownership, "flush_interval": "3600"}) | vba
        worker = run.worker(env, processes, name="flush")
        app = producer_app(env)
        sandbox.admin.reset()
        assert sandbox.process is not None
        meter = CpuMeter(
            worker.pid,
            others={"sandbox": sandbox.process.pid},
            services=() if embedded else ("postgres", "redis"),
            database_url=None if embedded else url,
        )
        with store(url) as engine:
            meter.start()
            started = time.time()
            app.send_task("accumsync.flush_due", argsrepr="()")
            timeout = pairs / RATE * 3 * (2 if ownership == "shared" else 1) + 120
            wait_until(lambda: dirty(engine) == 0, timeout, interval=0.5, what="every pair flushed")
            elapsed = time.time() - started
            cpu = meter.stop()
            window, attempts = call_window(engine)
            windows = read_to_put(engine)
        counters = sandbox.admin.counters()
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
        "cpu": cpu,
        "cpu_other_databases": meter.foreign_postgres,
        "cpu_postgres_split": meter.postgres_split,
    }


def read_to_put(engine: Engine) -> list[int]:
    """Every batch call's read-to-write window (ms), sorted."""
    f = T_ATTEMPT.c
    sql = select(f.read_to_put_ms).where(f.read_to_put_ms.is_not(None))
    with engine.connect() as conn:
        return sorted(int(v) for v in conn.execute(sql).scalars())


def percentile(sorted_values: list[int], share: float) -> int:
    """The nearest-rank percentile of an ascending list."""
    if not sorted_values:
        return 0
    rank = max(1, math.ceil(share * len(sorted_values)))
    return sorted_values[rank - 1]


#: CPU parts as the table's columns (``CpuMeter``'s names, shortened).
CPU_COLUMNS = {
    "worker pool": "cpu_ms_pool",
    "worker main (broker I/O)": "cpu_ms_main",
    "sandbox": "cpu_ms_sandbox",
    "postgres": "cpu_ms_postgres",
    "redis": "cpu_ms_redis",
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--pairs", type=int, default=5_000)
    parser.add_argument("--shared-pairs", type=int, default=1_000)
    parser.add_argument("--embedded-pairs", type=int, default=1_000)
    parser.add_argument("--processes", type=int, default=4)
    args = parser.parse_args()
    report = Report("flush", vars(args) | {"rate": RATE, "burst": BURST})
    for ownership, pairs in (("exclusive", args.pairs), ("shared", args.shared_pairs)):
        if pairs:
            figures(report, ownership, pairs, args.processes)
    if args.embedded_pairs:
        figures(report, "exclusive", args.embedded_pairs, 1, embedded=True)
    report.note(
        f"the first {BURST} calls ride the burst; the steady state cannot exceed {RATE:.0f}/s"
    )
    report.note(
        "cpu_ms_*: CPU milliseconds per flushed pair from the fan-out until the last pair is "
        "clean, read from /proc: the worker's pool processes, its main process, the sandbox "
        "process, every postgres process but other databases' backends, every redis-server "
        "process (Redis serves anything else running too); no Postgres or Redis in the embedded "
        "phase. The benchmark process itself is not counted (its store polling, twice a second, "
        "is, in postgres)"
    )
    report.save()


def figures(
    report: Report, ownership: str, pairs: int, processes: int, embedded: bool = False
) -> None:
    """One phase's row, targets and notes."""
    name = "embedded" if embedded else ownership
    got = phase(ownership, pairs, processes, embedded)
    calls, reads, throttled = got["calls"], got["reads"], got["throttled"]
    rate = (calls + reads) / got["window"]
    per_pair = calls / pairs
    windows = got["read_to_put_ms"]
    p50, p99 = percentile(windows, 0.5), percentile(windows, 0.99)
    cpu_ms = {CPU_COLUMNS[k]: round(v * 1000 / pairs, 2) for k, v in got["cpu"].items()}
    report.row(
        phase=name,
        setup=("SQLite broker -> 1 process -> SQLite" if embedded else "Redis -> Postgres"),
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
        **{c: cpu_ms.get(c, "") for c in CPU_COLUMNS.values()},
        cpu_ms_per_pair=round(sum(cpu_ms.values()), 2),
    )
    report.target(f"{name}: VBA calls/s / 25", round(rate / RATE, 3), ">= 0.9", rate / RATE >= 0.9)
    report.target(f"{name}: sandbox 429s", throttled, "0", throttled == 0)
    report.target(f"{name}: batch calls per dirty pair", round(per_pair, 3), "1.0", per_pair == 1.0)
    if windows:
        period = 1000 / RATE
        report.note(
            f"{name}: read-to-write window p50 {p50} ms ({p50 / period:.1f} token periods of "
            f"{period:.0f} ms), p99 {p99} ms, max {windows[-1]} ms over {len(windows)} batch calls"
        )
    seconds = sum(got["cpu"].values())
    report.note(
        f"{name}: CPU {seconds:.1f} s in {got['elapsed']:.0f} s "
        f"({seconds / got['elapsed']:.2f} of a core); by part, s: "
        + ", ".join(f"{k} {v:.2f}" for k, v in got["cpu"].items())
        + (
            "; postgres = this database's backends "
            f"{got['cpu_postgres_split']['backends']:.2f} + the server's own processes "
            f"{got['cpu_postgres_split']['shared']:.2f}; other databases' backends meanwhile "
            f"(not counted) {got['cpu_other_databases']:.2f}"
            if not embedded
            else ""
        )
    )
    report.note(f"{name}: flush_attempt rows {got['attempts']}; requests by route {got['routes']}")


if __name__ == "__main__":
    main()
