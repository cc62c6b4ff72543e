"""Ingest throughput: events/s from the first publish to the last commit, against a naive baseline.

``python -m bench.ingest`` runs three phases, one after the other, each on a fresh store:

1. batched: N events (default 200,000) published through Redis in messages of the product's
   default size (``ACCUMSYNC_INGEST_BATCH_SIZE``) to
   ``celery -A worker worker -c 2``, into Postgres (accumsync as shipped); then the same N
   through kombu's own Redis transport (``ACCUMSYNC_BROKER_FETCH=kombu``), the cost of the
   reliable fetch (worker/redisbroker.py) being the ratio of the two; then the same N with
   ``accumsync dispatch`` beside the worker, real-time flushing's cost to ingest;
2. naive: the baseline, one Celery task per event doing an ORM read-modify-write
   (``bench/naive.py``), same broker, store and pool, on a smaller N (a rate does not need the
   full N, and the full N would take an hour);
3. embedded: the defaults (SQLite store, kombu's SQLite broker, one worker process).

Every phase checks its final totals against the independent oracle (``expected_totals``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Any

from sqlalchemy import text

from bench.common import CpuMeter, Report, Run, events_ingested, store, wait_until
from bench.naive import TASK as NAIVE_TASK
from tests.stack import Stack, same_totals
from worker.demo.streams import StreamSpec, expected_totals, generate

WAL = "(WAL written)"


@dataclass
class Phase:
    name: str
    setup: str
    events: int
    seconds: float
    totals_ok: bool
    cpu: dict[str, float]
    disk: dict[str, int] | None = None

    @property
    def rate(self) -> float:
        return self.events / self.seconds

    def cpu_us_per_event(self) -> dict[str, float]:
        """CPU microseconds each part spent per event, and their total."""
        per = {k: round(v * 1e6 / self.events, 1) for k, v in self.cpu.items()}
        return per | {"total": round(sum(per.values()), 1)}


def stream(n: int, members: int, seed: int) -> list[dict[str, Any]]:
    """The realistic mix: new claims, versions, reversals, key moves, 5% duplicates."""
    return generate(StreamSpec(events=n, members=members, groups=5, seed=seed))


def run_phase(
    run: Run,
    name: str,
    events: list[dict[str, Any]],
    *,
    database_url: str,
    broker_url: str | None = None,
    concurrency: int = 2,
    task: str = "accumsync.ingest",
    batch: int | None = None,
    dispatcher: bool = False,
    **settings: str,
) -> Phase:
    """Start a worker, publish ``events`` from a producer process, wait for the last commit.

    ``dispatcher``: ``accumsync dispatch`` runs beside it, admitting the pairs ingest dirties
    (their flushes queue up unconsumed: the worker takes the ingest queue only, and no VBA is
    here), which is what real-time flushing adds to ingest's machine."""
    env = run.env(database_url, broker_url, **settings)
    queues = [env["ACCUMSYNC_QUEUE"]] if dispatcher else []
    child = run.worker(env, concurrency, include=["bench.naive"], name=name, queues=queues)
    admitting = run.dispatcher(env) if dispatcher else None
    others = {"dispatcher": admitting.pid} if admitting else {}
    postgres = database_url.startswith("postgresql")
    meter = CpuMeter(
        child.pid,
        others=others,
        services=("postgres", "redis") if postgres else (),
        database_url=database_url if postgres else None,
    )
    meter.start()
    path = run.tmp / f"{name}.json"
    path.write_text(json.dumps(events))
    sizing = ["--batch", str(batch)] if batch else []  # else the product's default
    producer = subprocess.Popen(
        [sys.executable, "-m", "bench.publish", str(path), "--task", task, *sizing],
        env=env,
        stdout=subprocess.PIPE,
        text=True,
    )
    with store(database_url) as engine:
        empty = disk_bytes(engine) if postgres else None
        done = done_check(engine, task, events)
        wait_until(done, timeout=3600, interval=0.05, what=f"{name}: all events committed")
        finished = time.time()
        disk = grown(empty, disk_bytes(engine)) if empty is not None else None
    cpu = meter.stop()
    out, _ = producer.communicate(timeout=600)
    printed = dict(field.split("=") for field in out.split())
    cpu["publisher"] = float(printed["cpu"])
    run.stop(child)
    if admitting:
        run.stop(admitting)
    ok = same_totals(Stack(run.tmp, database_url=database_url).totals(), expected_totals(events))
    fetch = {"kombu": " (kombu's fetch)", "reliable": " (reliable fetch)"}.get(
        settings.get("broker_fetch", ""), ""
    )
    setup = f"{broker_name(env)}{fetch} -> {concurrency} process(es) -> {store_name(database_url)}"
    setup += ", the dispatcher admitting" if dispatcher else ""
    seconds = finished - float(printed["t0"])
    return Phase(name, setup, len(events), seconds, ok == [], cpu, disk)


#: Each table's size with its indexes and TOAST, the whole database's, and the server's WAL
#: position (what lies between two readings is the WAL written meanwhile: nothing else writes
#: during a run, and the figure does not depend on how fast the machine is, as CPU and events/s
#: do).
DISK_SQL = text(
    "SELECT c.relname, pg_total_relation_size(c.oid) FROM pg_class c "
    "JOIN pg_namespace n ON n.oid = c.relnamespace "
    "WHERE n.nspname = 'public' AND c.relkind = 'r' "
    "UNION ALL SELECT '(database)', pg_database_size(current_database()) "
    f"UNION ALL SELECT '{WAL}', CAST(pg_current_wal_lsn() - '0/0' AS BIGINT)"
)


def disk_bytes(engine: Any) -> dict[str, int]:
    """Bytes on disk by table (indexes and TOAST included), the database's, and the WAL's
    position."""
    with engine.connect() as conn:
        return {name: int(size) for name, size in conn.execute(DISK_SQL)}


def wal_note(phase: Phase) -> str:
    """The WAL a phase wrote per event (ingest, folds and their checkpoints' full pages)."""
    assert phase.disk is not None
    return f"WAL written per event: {phase.disk.get(WAL, 0) / phase.events:,.0f} bytes"


def grown(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    """What each table (and the database) grew by, largest first, those that grew only."""
    growth = {k: v - before.get(k, 0) for k, v in after.items()}
    return dict(sorted(((k, v) for k, v in growth.items() if v > 0), key=lambda kv: -kv[1]))


def done_check(engine: Any, task: str, events: list[dict[str, Any]]) -> Any:
    """A check that every event of the phase is committed."""
    if task == "accumsync.ingest":
        return lambda: events_ingested(engine) >= len(events)
    unique = len({e["event_id"] for e in events})
    sql = text("SELECT count(*) FROM received_event")

    def naive_done() -> bool:
        with engine.connect() as conn:
            return int(conn.execute(sql).scalar()) >= unique

    return naive_done


def broker_name(env: dict[str, str]) -> str:
    return "Redis" if env["ACCUMSYNC_BROKER_URL"].startswith("redis") else "SQLite broker"


def store_name(url: str) -> str:
    return "Postgres" if url.startswith("postgresql") else "SQLite"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--events", type=int, default=200_000, help="batched phase")
    parser.add_argument("--naive-events", type=int, default=10_000, help="baseline phase")
    parser.add_argument("--embedded-events", type=int, default=20_000, help="embedded phase")
    parser.add_argument("--members", type=int, default=20_000)
    parser.add_argument("--skip-embedded", action="store_true")
    parser.add_argument(
        "--compare",
        choices=sorted(VARIANTS),
        help="only the batched phase, its two variants interleaved (ABBA...) --repeat times "
        "each: the phases above run in a fixed order, and later phases ran slower on this "
        "machine whatever they were",
    )
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument(
        "--only-batched",
        action="store_true",
        help="the batched phase alone (reliable fetch, no dispatcher): what bench.versus runs "
        "in each of two checkouts",
    )
    args = parser.parse_args()
    if args.compare:
        compare(args)
        return
    if args.only_batched:
        only_batched(args)
        return

    report = Report("ingest", vars(args))
    phases: list[Phase] = []
    with Run("ingest") as run:
        big = stream(args.events, args.members, seed=1)
        reliable = {"broker_fetch": "reliable"}
        phases.append(run_phase(run, "batched", big, database_url=run.database(), **reliable))
        kombu = run_phase(
            run, "batched-kombu", big, database_url=run.database(), broker_fetch="kombu"
        )
        phases.append(kombu)
        dispatched = run_phase(
            run, "batched-dispatch", big, database_url=run.database(), dispatcher=True
        )
        phases.append(dispatched)
        del big
        small = stream(args.naive_events, args.members, seed=2)
        naive = run_phase(
            run, "naive", small, database_url=run.database(), task=NAIVE_TASK, batch=1
        )
        phases.append(naive)
        if not args.skip_embedded:
            url, broker = run.sqlite()
            embedded = stream(args.embedded_events, args.members, seed=3)
            phases.append(
                run_phase(
                    run, "embedded", embedded, database_url=url, broker_url=broker, concurrency=1
                )
            )
    for p in phases:
        report.row(
            phase=p.name,
            setup=p.setup,
            events=p.events,
            seconds=round(p.seconds, 2),
            events_per_s=round(p.rate),
            vs_naive=f"{p.rate / naive.rate:.1f}x",
            totals_exact="yes" if p.totals_ok else "NO",
        )
    for p in phases:
        per = p.cpu_us_per_event()
        ceiling = os.cpu_count() or 1
        report.note(
            f"{p.name}: CPU per event, us: "
            + ", ".join(f"{k} {v:,.1f}" for k, v in per.items())
            + f"; {ceiling} cores at 100% for that total would allow "
            + f"{ceiling * 1e6 / per['total']:,.0f} events/s"
        )
    for p in phases:
        if p.disk:
            per = {k: round(v / p.events) for k, v in p.disk.items()}
            whole = ("(database)", WAL)
            tables = ", ".join(f"{k} {v:,}" for k, v in per.items() if k not in whole)
            report.note(
                f"{p.name}: bytes on disk per event: {per['(database)']:,} for the database "
                f"(WAL not counted); by table with its indexes: {tables}; {wal_note(p)}"
            )
    batched = phases[0]
    report.target("batched events/s", round(batched.rate), ">= 20,000", batched.rate >= 20_000)
    cost = round(batched.rate / kombu.rate, 3)
    report.target("reliable fetch / kombu's transport", cost, ">= 0.95", cost >= 0.95)
    dispatch = round(dispatched.rate / batched.rate, 3)
    report.target("with the dispatcher / without", dispatch, ">= 0.95", dispatch >= 0.95)
    ratio = round(batched.rate / naive.rate, 1)
    report.target("batched / naive", ratio, ">= 30x", ratio >= 30)
    report.note(
        f"naive ran {naive.events:,} events (a rate; one task per event at this speed would take "
        f"{args.events / naive.rate / 60:.0f} min for {args.events:,})"
    )
    report.note("2 cores shared by Postgres, Redis, the worker processes and the publisher")
    report.save()


def only_batched(args: argparse.Namespace) -> None:
    """The batched phase alone: events/s, CPU per event by part, bytes on disk per event."""
    report = Report("ingest-batched", vars(args))
    with Run("ingest-batched") as run:
        events = stream(args.events, args.members, seed=1)
        phase = run_phase(
            run, "batched", events, database_url=run.database(), broker_fetch="reliable"
        )
    per = phase.cpu_us_per_event()
    report.row(
        phase=phase.name,
        setup=phase.setup,
        events=phase.events,
        seconds=round(phase.seconds, 2),
        events_per_s=round(phase.rate),
        cpu_us_per_event=per.pop("total"),
        **per,
        totals_exact="yes" if phase.totals_ok else "NO",
    )
    if phase.disk:
        report.note(f"bytes on disk per event: {phase.disk['(database)'] / phase.events:,.0f}")
        report.note(wal_note(phase))
    report.note(f"load average at the end: {os.getloadavg()}")
    report.save()


#: The variants ``--compare`` runs, each a name and run_phase's options: the baseline first.
VARIANTS: dict[str, list[tuple[str, dict[str, Any]]]] = {
    "dispatcher": [("without", {}), ("with", {"dispatcher": True})],
    "fetch": [("kombu", {"broker_fetch": "kombu"}), ("reliable", {"broker_fetch": "reliable"})],
    "batch": [("500", {"batch": 500}), ("2000", {"batch": 2000})],
    "batch-large": [("2000", {"batch": 2000}), ("5000", {"batch": 5000})],
}


def compare(args: argparse.Namespace) -> None:
    """The batched phase in both variants of ``args.compare``, interleaved: A B B A A B..."""
    report = Report(f"ingest-compare-{args.compare}", vars(args))
    (base, base_opts), (other, other_opts) = VARIANTS[args.compare]
    rates: dict[str, list[float]] = {base: [], other: []}
    phases: list[Phase] = []
    with Run("ingest-compare") as run:
        big = stream(args.events, args.members, seed=1)
        for i in range(args.repeat * 2):
            name, opts = (base, base_opts) if i % 4 in (0, 3) else (other, other_opts)
            phase = run_phase(run, f"{name}-{i + 1}", big, database_url=run.database(), **opts)
            rates[name].append(phase.rate)
            phases.append(phase)
    parts = list(dict.fromkeys(k for p in phases for k in p.cpu_us_per_event() if k != "total"))
    for phase in phases:
        per = phase.cpu_us_per_event()
        report.row(
            run=phase.name,
            events_per_s=round(phase.rate),
            cpu_us_per_event=per["total"],
            **{k: per.get(k, "-") for k in parts},
            totals_exact="yes" if phase.totals_ok else "NO",
        )
    mean = {k: sum(v) / len(v) for k, v in rates.items()}
    ratio = round(mean[other] / mean[base], 3)
    report.target(f"{other} / {base}, mean events/s", ratio, ">= 0.95", ratio >= 0.95)
    report.note(f"mean events/s: {other} {mean[other]:,.0f}, {base} {mean[base]:,.0f}")
    report.note(f"load average at the end: {os.getloadavg()}")
    report.save()


if __name__ == "__main__":
    main()
