"""Ingest and flush at once: a steady ingest stream while dirty pairs flush at VBA's rate limit.

``python -m bench.mixed [--rate 4000] [--seconds 210] [--pairs 5000]``: the store is seeded with
``--pairs`` dirty (subscriber, group) pairs of two accumulators each (in-process ingest, not
timed; subscribers ``S9000000`` onwards, none of which the stream names), then, at once:

- ingest: a publisher process sends the realistic stream (``worker.demo.streams``) through
  Redis at a steady ``--rate`` events/s for ``--seconds`` (messages of 500, each leaving on
  schedule) to the ingest queue, consumed by ``celery -A worker worker -c 2 -Q <queue>``;
- flush: one ``accumsync.flush_due`` fans the seeded pairs out on the flush queue
  (``ACCUMSYNC_FLUSH_QUEUE``), consumed by ``celery -A worker worker -c 4 -Q <queue>.flush``
  (exclusive ownership: one batch PUT per pair) against a sandbox enforcing 25 req/s, burst 50.

Two workers, one per queue, as compose.yaml runs them. Every second the ingest queue's length
(messages waiting in Redis) is sampled. Baselines: the offered rate (ingest achieved / offered),
the rate limit (flush calls/s / 25), the first backlog sample (growth). The store's totals are
checked against the oracle (``expected_totals``) over every event, seeded ones included, and the
sandbox's rows against the oracle of the seeded events (the only pairs flushed).
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC

import redis
from sqlalchemy import Engine, func, select

from bench.common import CpuMeter, Report, Run, events_ingested, producer_app, store, wait_until
from bench.flush import BURST, RATE, call_window, dirty, event, seed
from tests.services import ensure_redis
from tests.stack import Stack, remote_totals, same_totals
from worker.demo.sandboxes import running_sandbox
from worker.demo.streams import StreamSpec, expected_totals, generate
from worker.store.tables import T_ATTEMPT, T_BATCH, T_PAIR

#: Seeded subscribers start here: the stream's members are ``S0000000`` up to ``--members``.
FIRST_SEEDED = 9_000_000
BATCH = 500
#: kombu's Redis transport keeps a queue as a list under its name, and one per priority step.
PRIORITY_SEP = "\x06\x16"


@dataclass
class Sampler:
    """The ingest queue's length (messages) once a second, in a thread of its own."""

    client: redis.Redis
    queue: str
    samples: list[tuple[float, int]] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def length(self) -> int:
        keys = [self.queue] + [f"{self.queue}{PRIORITY_SEP}{p}" for p in (3, 6, 9)]
        return sum(int(self.client.llen(k)) for k in keys)

    def run(self) -> None:
        next_at = time.time()
        while not self.stop.is_set():
            self.samples.append((time.time(), self.length()))
            next_at += 1.0
            self.stop.wait(max(0.0, next_at - time.time()))

    def between(self, t0: float, t1: float) -> list[int]:
        return [n for t, n in self.samples if t0 <= t <= t1]


def seeded_pairs(engine: Engine) -> int:
    """The highest pair id right after seeding: every seeded pair's id is at most this."""
    with engine.connect() as conn:
        last = conn.execute(select(func.max(T_PAIR.c.id))).scalar()
    return int(last or 0)


def last_commit(engine: Engine) -> tuple[float, int, int]:
    """(wall-clock time of the last ingest batch the workers recorded, batches, events)."""
    b = T_BATCH.c
    with engine.connect() as conn:
        at, rows, received = conn.execute(
            select(func.max(b.at), func.count(), func.coalesce(func.sum(b.received), 0))
        ).one()
    return (float(at.timestamp()) if at is not None else 0.0), int(rows), int(received)


def flush_started(engine: Engine) -> bool:
    """Whether a flush has recorded an attempt (flush_due's fan-out is then done)."""
    with engine.connect() as conn:
        return conn.execute(select(T_ATTEMPT.c.pair_id).limit(1)).first() is not None


def calls_between(engine: Engine, t0: float, t1: float) -> int:
    """Batch calls that started between two wall-clock times."""
    f = T_ATTEMPT.c
    sql = select(f.started_at).where(f.pair_id.is_not(None))
    with engine.connect() as conn:
        started = [s if s.tzinfo else s.replace(tzinfo=UTC) for (s,) in conn.execute(sql)]
    return sum(1 for s in started if t0 <= s.timestamp() <= t1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rate", type=float, default=4_000, help="ingest events/s offered")
    parser.add_argument("--seconds", type=float, default=210, help="how long ingest is offered")
    parser.add_argument("--pairs", type=int, default=5_000, help="dirty pairs to flush")
    parser.add_argument("--members", type=int, default=20_000)
    parser.add_argument("--ingest-processes", type=int, default=2)
    parser.add_argument("--flush-processes", type=int, default=4)
    args = parser.parse_args()
    report = Report("mixed", vars(args) | {"vba_rate": RATE, "vba_burst": BURST, "batch": BATCH})

    n = int(args.rate * args.seconds)
    events = generate(StreamSpec(events=n, members=args.members, groups=5, seed=4))
    seeded = [  # what bench.flush.seed writes, for the oracle
        event(i, code)
        for i in range(FIRST_SEEDED, FIRST_SEEDED + args.pairs)
        for code in ("DED", "OOP")
    ]

    with Run("mixed") as run, running_sandbox(rate=RATE, burst=BURST) as sandbox:
        url = run.database()
        seed(url, args.pairs, first=FIRST_SEEDED)
        vba = {k: v for k, v in sandbox.env().items() if k.startswith("ACCUMSYNC_VBA_")}
        extra = {"flush_queue": f"{run.tag}.flush", "ownership": "exclusive"}
        env = run.env(url, **extra, flush_interval="3600") | vba
        ingest_q, flush_q = env["ACCUMSYNC_QUEUE"], env["ACCUMSYNC_FLUSH_QUEUE"]
        ingest_w = run.worker(env, args.ingest_processes, name="ingest", queues=[ingest_q])
        flush_w = run.worker(env, args.flush_processes, name="flush", queues=[flush_q])
        app = producer_app(env)
        sandbox.admin.reset()
        path = run.tmp / "events.json"
        path.write_text(json.dumps(events))
        assert sandbox.process is not None
        meter = CpuMeter(
            workers={"ingest": ingest_w.pid, "flush": flush_w.pid},
            others={"sandbox": sandbox.process.pid},
            database_url=url,
        )
        sampler = Sampler(redis.Redis.from_url(ensure_redis()), ingest_q)
        with store(url) as engine:
            last_seeded = seeded_pairs(engine)
            _, rows0, before = last_commit(engine)  # the seed's own ingest batches
            # The fan-out first: a flush_due that ran after the stream's first commits would
            # flush the stream's pairs dirty by then too (a run saw 475 of them in VBA). It is
            # done once a flush has started; flushing 5,000 pairs outlasts the stream.
            flush_sent = time.time()
            app.send_task("accumsync.flush_due", argsrepr="()")
            wait_until(lambda: flush_started(engine), 60, interval=0.05, what="the fan-out")
            argv = [sys.executable, "-m", "bench.publish", str(path), "--batch", str(BATCH)]
            publisher = subprocess.Popen(
                [*argv, "--rate", str(args.rate)],
                env=env,
                stdout=subprocess.PIPE,
                text=True,
            )
            assert publisher.stdout is not None
            first = publisher.stdout.readline()  # "started t0=..." as the first batch leaves
            if not first.startswith("started"):
                raise RuntimeError(f"publisher: {first!r}")
            meter.start()
            thread = threading.Thread(target=sampler.run, daemon=True)
            thread.start()
            flushed_at: list[float] = []
            ingested_at: list[float] = []

            def done() -> bool:
                if not flushed_at and dirty(engine, below_pair=last_seeded) == 0:
                    flushed_at.append(time.time())
                if not ingested_at and events_ingested(engine) >= before + n:
                    ingested_at.append(time.time())
                return bool(flushed_at and ingested_at)

            timeout = max(args.seconds, args.pairs / RATE) * 3 + 120
            wait_until(done, timeout, interval=1.0, what="every event ingested, every pair flushed")
            cpu = meter.stop()
            sampler.stop.set()
            thread.join()
            out, _ = publisher.communicate(timeout=60)
            printed = dict(f.split("=") for f in out.split())
            t0, t1 = float(printed["t0"]), float(printed["t1"])
            window, attempts = call_window(engine)
            committed, batches, received = last_commit(engine)
            batches, received = batches - rows0, received - before
            overlap = calls_between(engine, t0, t1)
        counters = sandbox.admin.counters()
        remote = remote_totals(sandbox.admin.rows())
        ours = Stack(run.tmp, database_url=url).totals()
    diff_store = len(same_totals(ours, expected_totals(events + seeded)))
    diff_vba = len(same_totals(remote, expected_totals(seeded)))
    ok_store, ok_vba = diff_store == 0, diff_vba == 0

    routes = counters["by_route"]
    calls = sum(routes.get("accumulators.batch", {}).values())
    reads = sum(routes.get("accumulators.list", {}).values())
    throttled = int(counters["by_status"].get("429", 0))
    flush_rate = (calls + reads) / window
    offered = n / (t1 - t0)
    achieved = n / (committed - t0)
    backlog = sampler.between(t0, t1)
    first_q, last_q, max_q = backlog[0], backlog[-1], max(backlog)
    after = sampler.between(t1, committed + 1)
    report.row(
        setup=(
            f"Redis -> ingest worker -c {args.ingest_processes} + flush worker "
            f"-c {args.flush_processes} -> Postgres; sandbox {RATE:.0f}/s burst {BURST}"
        ),
        flush_pairs=args.pairs,
        flush_calls=calls,
        flush_seconds_first_to_last_call=round(window, 1),
        flush_calls_per_s=round(flush_rate, 2),
        flush_vs_limit=f"{flush_rate / RATE:.2f}",
        sandbox_429s=throttled,
        ingest_events=n,
        ingest_offered_per_s=round(offered),
        ingest_achieved_per_s=round(achieved),
        achieved_vs_offered=f"{achieved / offered:.3f}",
        backlog_msgs_first=first_q,
        backlog_msgs_last=last_q,
        backlog_msgs_max=max_q,
        totals_exact="yes" if ok_store else "NO",
        vba_totals_exact="yes" if ok_vba else "NO",
    )
    report.target("flush calls/s / 25", round(flush_rate / RATE, 3), ">= 0.9", flush_rate >= 22.5)
    report.target("sandbox 429s", throttled, "0", throttled == 0)
    ratio = achieved / offered
    report.target("ingest achieved / offered", round(ratio, 3), ">= 0.98", ratio >= 0.98)
    report.target(
        "ingest backlog growth, messages (last - first sample)",
        last_q - first_q,
        "<= 2 (no growth)",
        last_q - first_q <= 2,
    )
    report.target("store totals vs oracle, fields differing", diff_store, "0", diff_store == 0)
    report.target("VBA totals vs oracle, fields differing", diff_vba, "0", diff_vba == 0)
    flush_end = flushed_at[0] - flush_sent
    report.note(
        f"ingest published {t1 - t0:.1f} s (nominal {args.rate:,.0f}/s for {args.seconds:.0f} s, "
        f"the latest message {float(printed['late_max']) * 1000:.0f} ms behind its schedule); "
        f"last commit {committed - t1:.1f} s after the last publish; ingest_batch rows "
        f"{batches:,} ({received:,} events) for {math.ceil(n / BATCH):,} messages ({n:,} events)"
    )
    report.note(
        f"backlog: {len(backlog)} samples (1/s) while publishing, messages of {BATCH} events: "
        f"first {first_q}, last {last_q}, max {max_q}, mean {sum(backlog) / len(backlog):.2f}; "
        f"after the last publish: {after}"
    )
    report.note(
        f"flush: every seeded pair clean {flush_end:.1f} s after the fan-out; "
        f"{overlap} of {calls} batch calls started while ingest was publishing; "
        f"flush_attempt rows {attempts}; requests by route {routes}"
    )
    seconds = max(flushed_at[0], ingested_at[0]) - flush_sent
    report.note(
        f"CPU over {seconds:.0f} s, cores used by part: "
        + ", ".join(f"{k} {v / seconds:.2f}" for k, v in cpu.items())
        + f"; total {sum(cpu.values()) / seconds:.2f} of 2 (the publisher: "
        + f"{float(printed['cpu']) / (t1 - t0):.2f}); postgres = this database's backends "
        + f"{meter.postgres_split['backends'] / seconds:.2f} + the server's own processes "
        + f"{meter.postgres_split['shared'] / seconds:.2f}; other databases' Postgres backends "
        + f"meanwhile, not counted: {meter.foreign_postgres / seconds:.2f}"
    )
    report.note(
        "totals_exact: the store's totals against expected_totals over every event (stream and "
        "seeded); vba_totals_exact: the sandbox's rows against expected_totals of the seeded "
        "events (the only pairs flushed)"
    )
    report.save()


if __name__ == "__main__":
    main()
