"""Freshness: how long after a publish the sandbox holds the new total, at a steady event rate.

``python -m bench.freshness [--rate 2000 --seconds 60 --interval 5]``: a paced producer sends
``--rate`` events/s (messages of rate/4 events, 4 a second) for ``--seconds`` to one
``celery -A worker worker -c 4`` with beat flushing every ``--interval`` s (exclusive ownership)
to a sandbox enforcing 25 req/s, burst 50. Each message carries one probe: a new 1.00 claim on
one of ten probe keys. Probe k of a key has landed once the sandbox's ``allowed_Amt`` for that
key reaches k, polled every 0.2 s; its delay is that moment minus its publish time.

The members default to 100 (100 pairs): VBA's 25 calls/s allow at most 25 x interval pair
flushes per interval, so a stream touching more pairs than that per interval falls behind
whatever the worker does (see the note the benchmark prints).

``--late-rate 0.05`` measures what the settle grace costs under late landings: the same stream
runs twice in one command, first on a healthy sandbox (the baseline), then with that share of
batch calls answered at once by a gateway (502 or 504) and written ``--late-seconds`` later.
A key whose write may still land waits until the grace has passed (``--settle-grace``, the
product's 120 s by default) before anything more is sent for it; the report gives both runs'
p50/p95/max freshness, their ratio, and how many batch calls (keys waiting a grace) met it.
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time
from decimal import Decimal
from typing import Any

from bench.common import Report, Run, producer_app, store, wait_until
from worker.demo.sandboxes import running_sandbox
from worker.demo.streams import StreamSpec, generate

TICK = 0.25
PROBE_KEYS = 10


def probe(n: int) -> dict[str, Any]:
    """The n-th probe: a new claim of 1.00 on probe key n % 10 (members 0..9)."""
    j = n % PROBE_KEYS
    return {
        "event_id": f"probe-{n}",
        "claim_id": f"probe-{n}",
        "version": 0,
        "status": "adjudicated",
        "subscriber_id": f"S{j:07d}",
        "group_id": f"GRP{j % 5:03d}",
        "plan_year": "2026",
        "plan_type": "MED",
        "benefit_code": "PROBE",
        "network": "in",
        "amounts": {"allowed": "1.00"},
    }


class Watcher:
    """Polls the sandbox for the probe keys' totals and records each probe's delay."""

    def __init__(self, admin: Any) -> None:
        self.admin, self.pending, self.delays = admin, [], []
        self.lock, self.stop = threading.Lock(), threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def sent(self, n: int, at: float) -> None:
        with self.lock:
            self.pending.append((n % PROBE_KEYS, n // PROBE_KEYS + 1, at))

    def _run(self) -> None:
        while not self.stop.wait(0.2):
            seen = time.time()
            totals = {
                r["subscriber_ID"]: Decimal(str(r["allowed_Amt"]))
                for r in self.admin.rows()
                if r["benefit_Code"] == "PROBE"
            }
            with self.lock:
                still = []
                for key, count, at in self.pending:
                    if totals.get(f"S{key:07d}", Decimal(0)) >= count:
                        self.delays.append(seen - at)
                    else:
                        still.append((key, count, at))
                self.pending = still


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rate", type=int, default=2_000, help="events/s")
    parser.add_argument("--seconds", type=int, default=60)
    parser.add_argument("--interval", type=float, default=5.0, help="flush interval, s")
    parser.add_argument("--members", type=int, default=100)
    parser.add_argument("--late-rate", type=float, default=0.0, help="share of late batch calls")
    parser.add_argument("--late-seconds", type=float, default=0.5, help="how late they land")
    parser.add_argument("--settle-grace", type=float, default=120.0, help="ACCUMSYNC_SETTLE_GRACE")
    args = parser.parse_args()
    report = Report("freshness", vars(args))
    runs = [("baseline", 0.0)] + ([("late landings", args.late_rate)] if args.late_rate else [])
    figures = {label: run_once(args, late) for label, late in runs}
    for label, got in figures.items():
        report.row(run=label, **{k: v for k, v in got.items() if not k.startswith("_")})
    base = figures["baseline"]
    report.target("p50 publish -> VBA (s)", base["p50_s"], "reported", True)
    report.target("p95 publish -> VBA (s)", base["p95_s"], "reported", True)
    throttled = sum(int(got["sandbox_429s"]) for got in figures.values())
    report.target("sandbox 429s", throttled, "0", throttled == 0)
    if args.late_rate:
        late = figures["late landings"]
        ratio = late["p95_s"] / base["p95_s"] if base["p95_s"] else float("inf")
        report.target("p95 with late landings / baseline", round(ratio, 2), "reported", True)
        report.note(
            f"late landings: {late['late_calls']} of {late['batch_calls']} batch calls answered "
            f"at once by a gateway and written {args.late_seconds:g} s later; each of their keys "
            f"waited the {args.settle_grace:g} s grace before anything more was sent for it"
        )
    report.note(
        f"{args.members} members: at most {args.members} pair flushes per {args.interval:g} s "
        f"interval, under VBA's {25 * args.interval:.0f}; longest ingest transaction "
        f"{base['_lag_ms']} ms"
    )
    report.save()


def run_once(args: argparse.Namespace, late_rate: float) -> dict[str, Any]:
    """One paced run; its freshness figures (``late_rate``: the sandbox's late landings)."""
    per_tick = int(args.rate * TICK)
    ticks = int(args.seconds / TICK)
    spec = StreamSpec(events=(per_tick - 1) * ticks, members=args.members, groups=5, seed=9)
    events = generate(spec)
    faults = {"late_rate": late_rate, "late_seconds": args.late_seconds} if late_rate else {}
    with Run("freshness") as run, running_sandbox(rate=25, burst=50, **faults) as sandbox:
        url = run.database()
        vba = {k: v for k, v in sandbox.env().items() if k.startswith("ACCUMSYNC_VBA_")}
        settings = {"ownership": "exclusive", "flush_interval": str(args.interval)}
        settings["settle_grace"] = str(args.settle_grace)
        env = run.env(url, **settings) | vba
        run.worker(env, 4, name="fresh")
        run.beat(env)
        from worker.ingest.producer import publish

        producer_app(env)
        watcher = Watcher(sandbox.admin)
        watcher.thread.start()
        start = time.time()
        for i in range(ticks):
            time.sleep(max(0.0, start + i * TICK - time.time()))
            publish([*events[i * (per_tick - 1) : (i + 1) * (per_tick - 1)], probe(i)], per_tick)
            watcher.sent(i, time.time())
        sent_for = time.time() - start
        try:
            wait = 180 + (args.settle_grace if late_rate else 0)
            wait_until(lambda: not watcher.pending, wait, interval=0.5, what="every probe landed")
        finally:
            watcher.stop.set()
        counters = sandbox.admin.counters()
        with store(url) as engine, engine.connect() as conn:
            from sqlalchemy import text

            lag = conn.execute(text("SELECT max(duration_ms) FROM ingest_batch")).scalar()

    delays = sorted(watcher.delays)
    p50 = statistics.median(delays)
    batch = counters["by_route"].get("accumulators.batch", {})
    return {
        "events_per_s": round(ticks * per_tick / sent_for),
        "seconds": round(sent_for, 1),
        "flush_interval_s": args.interval,
        "probes": len(delays),
        "p50_s": round(p50, 2),
        "p95_s": round(delays[int(0.95 * (len(delays) - 1))], 2),
        "max_s": round(delays[-1], 2),
        "p50_vs_interval": f"{p50 / args.interval:.2f}",
        "batch_calls": sum(batch.values()),
        "late_calls": int(batch.get("502", 0)) + int(batch.get("504", 0)),
        "sandbox_429s": int(counters["by_status"].get("429", 0)),
        "_lag_ms": lag,
    }


if __name__ == "__main__":
    main()
