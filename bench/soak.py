"""Soak: a steady stream with flushes running for many minutes, one fault injected every minute.

``python -m bench.soak [--minutes 30] [--rate 1000] [--fault-every 60] [--seed 1]``. The stack
is the production shape (compose.yaml): a fresh Postgres database on a server of the run's own
(``tests.chaos.pgserver.PrivatePostgres``, fsync off, so it can be restarted; on the shared
server when ``pg_restart`` is left out of ``--faults``), a private append-only
redis-server as the broker (``tests.chaos.conftest.PrivateRedis``, so it can be SIGKILLed and
restarted), an ingest worker (``-c 2 -Q <queue>``), a flush worker (``-c 4 -Q <queue>.flush``),
one beat, and a sandbox over loopback with a state file, enforcing VBA's 25 req/s, burst 50;
exclusive ownership (one batch PUT per pair).

Load: a publisher process sends the realistic stream (``worker.demo.streams.generate``: new
claims, replacements, reversals, key moves, 5% duplicates) at ``--rate`` events/s in messages of
500, drawn lazily in chunks of 20,000 events, each chunk's ids prefixed with its number so every
event id is unique across the run (a duplicate is the same event sent twice). The oracle is
exact without keeping the events: a claim's versions all fall in one chunk, so the run's
expected totals are the sum over chunks of ``expected_totals(chunk)`` (Decimal). A message the
broker refuses (it is down) is sent again until it goes: what a real producer does.

Faults: every ``--fault-every`` seconds one of these, in an order drawn with ``--seed`` (the list
shuffled, taken in turn, shuffled again: each comes as often as the others; ``--faults`` keeps a
subset): ``worker_kill`` (SIGKILL of the whole ingest or flush worker, started again, or of one
pool process, which its worker replaces), ``beat_kill`` (SIGKILL, started again), ``redis_kill``
(SIGKILL, started again after 3 s), ``pg_terminate`` (every backend of the run's database that is
in a transaction terminated every 0.02 s for 5 s, as ``tests/chaos/test_postgres_kill.py``),
``pg_restart`` (the store's whole server: ``pg_ctl restart -m fast``, or ``-m immediate``, a crash
and recovery from WAL), ``vba_outage`` (the sandbox answers every call 500, or 429 with Retry-After
2, for 20 s) and ``two_beats`` (a second beat for 60 s, at most 3/4 of the fault interval). Each
fault's recovery time runs from the moment the fault ends (for a SIGKILL, the kill itself: the
restart is part of the recovery) until the store shows both an ingest batch and a successful batch
call to VBA started after it; a flush waits for beat's next ``flush_due`` tick and for the flush
worker's queue, so recovery includes up to one flush interval.

Settings: production defaults except where a default would make recovery take longer than the
minute between faults, each scaled down and named here: ``flush_interval`` 15 s (production 60;
200 members make ~200 pairs, flushed once an interval: ~13 of VBA's 25 calls/s, leaving room
to catch up after an outage), ``flush_lease`` 10 s (120: a flush worker killed mid-flush holds
its pairs that long), ``settle_grace`` 10 s (120), ``vba_timeout`` 2.5 s (30),
``broker_visibility_timeout`` 20 s (300: a killed worker's unacknowledged messages come back
after it), ``backoff_base`` 0.5 s / ``backoff_max`` 5 s (2 / 900) and ``max_attempts`` 1000 (10:
with backoff compressed a thousandfold, 10 attempts would last seconds, not the hours they
last in production). Health-check interval, breaker, batch sizes, rate limit: production.

Figures: every 5 s each worker's RSS (its main process plus its pool), the ingest queue's length,
accumulators waiting for a flush, events recorded. Freshness: every 2 s a probe event (a new
1.00 claim on a probe member no stream event names) is published; its freshness is the time from
its publish until the sandbox's journal shows the write that brought the probe key's
``allowed_Amt`` to its count (the sandbox's own clock, same machine): p50/p95/max over all probes,
over those whose life (publish until VBA held it) overlaps no fault's window (its start until its
recovery), and over those it overlaps. ``accumsync dispatch`` runs beside beat, as in
compose.yaml, so a change starts its flush at once; the flush worker keeps prefork ``-c 4``
(compose runs threads) so that the pool-process kill has a process to kill.

At the end the publisher stops and the stack drains (every distinct event recorded, nothing waiting
for a flush, the ingest queue empty, every probe landed; or nothing moving for 2 minutes: something
was lost); then the checks, each a target (any unmet exits 1): no event lost (published, never
recorded; missing probes are named with their publish time); the store's totals and VBA's rows
equal the oracle to the cent; nothing stuck (no accumulator waiting or held, as
``worker.ops.queries`` tells health and status; pairs and accumulators still carrying retry state
are counted too); no dead letter (none is expected from valid events; each found is listed with its
source, kind and reason); every fault recovered; each worker's mean RSS over the last 5 minutes
within 1.25x of the first 5 minutes (a third of the run each when it is shorter than 15 minutes; a
worker restarted by a fault starts small again); events achieved vs offered and p95 freshness
(reported). The JSON, every sample and probe included, goes to
``bench/results/soak-TIMESTAMP.json``."""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import multiprocessing as mp
import os
import random
import signal
import statistics
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import psycopg
import redis
from sqlalchemy import Engine, func, select, text
from sqlalchemy.engine import make_url
from sqlmodel import Session, col

from bench.common import RESULTS, Report, Run, now_iso, pool_pids, producer_app, rss_mb
from bench.mixed import PRIORITY_SEP
from models.tables import Accumulator, DeadLetter, FlushAttempt, IngestBatch, Pair
from tests.chaos.conftest import PrivateRedis
from tests.chaos.pgserver import PrivatePostgres
from tests.services import PG_ADMIN
from tests.stack import Stack, remote_totals, same_totals
from worker.db import make_engine, upgrade
from worker.demo.procs import Child
from worker.demo.sandboxes import SandboxHandle, running_sandbox
from worker.demo.streams import Key, StreamSpec, expected_totals, generate
from worker.ops.queries import held, open_dead_letters, waiting_for_flush

RATE, BURST = 25.0, 50
BATCH = 500
CHUNK = 20_000
SAMPLE_EVERY = 5.0
PROBE_EVERY = 2.0
PROBE_SUBSCRIBER, PROBE_GROUP = "P0000001", "GRPPROBE"
FAULTS = (
    "worker_kill",
    "beat_kill",
    "redis_kill",
    "pg_terminate",
    "pg_restart",
    "vba_outage",
    "two_beats",
)
SETTINGS = {
    "ownership": "exclusive",
    "flush_interval": "15",
    "flush_lease": "10",
    "settle_grace": "10",
    "vba_timeout": "2.5",
    "broker_visibility_timeout": "20",
    "backoff_base": "0.5",
    "backoff_max": "5",
    "max_attempts": "1000",
}
#: Terminate only backends of the run's own database that are inside a transaction.
IN_TRANSACTION = """
SELECT pid, pg_terminate_backend(pid) FROM pg_stat_activity
WHERE datname = %s AND pid <> pg_backend_pid() AND xact_start IS NOT NULL
  AND state IN ('active', 'idle in transaction')
"""

Totals = dict[Key, dict[str, Decimal]]


# --- the stream and its oracle, in a publisher process of its own -------------------------------


def chunks(members: int, seed: int) -> Iterator[list[dict[str, Any]]]:
    """Endless chunks of the realistic stream, each chunk's ids prefixed ``kNNNN-``."""
    k = 0
    while True:
        spec = StreamSpec(events=CHUNK, members=members, groups=5, seed=seed * 100_003 + k)
        prefix = f"k{k:04d}-"
        yield [
            dict(e, event_id=prefix + e["event_id"], claim_id=prefix + e["claim_id"])
            for e in generate(spec)
        ]
        k += 1


def add_totals(into: Totals, more: Totals) -> None:
    for key, row in more.items():
        mine = into.setdefault(key, dict.fromkeys(row, Decimal("0.00")))
        for name, amount in row.items():
            mine[name] += amount


def publisher(
    env: dict[str, str],
    rate: float,
    seconds: float,
    members: int,
    seed: int,
    sent_so_far: Any,
    out: Connection,
) -> None:
    """Publish the stream at ``rate`` for ``seconds``; send back the figures and the oracle of
    exactly what was sent (a chunk cut short counts only its sent part)."""
    from worker.ingest.producer import publish

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent stops the run
    producer_app(env)
    oracle: Totals = {}
    distinct = sent = refused = 0
    late = 0.0
    t0 = time.time()
    out.send(("started", t0))
    marks: list[tuple[float, str]] = []  # per message: when it left, an id only it carries
    for chunk in chunks(members, seed):
        n = 0
        once = Counter(e["event_id"] for e in chunk)
        while n < len(chunk) and (due := t0 + sent / rate) < t0 + seconds:
            time.sleep(max(0.0, due - time.time()))
            late = max(late, time.time() - due)
            part = chunk[n : n + BATCH]
            while True:
                try:
                    publish(part, BATCH)
                    break
                except Exception:  # the broker is down: send it again, as a producer would
                    refused += 1
                    time.sleep(0.5)
            mark = next((e["event_id"] for e in part if once[e["event_id"]] == 1), None)
            if mark is not None:
                marks.append((time.time(), mark))
            n += len(part)
            sent += len(part)
            sent_so_far.value = sent
        add_totals(oracle, expected_totals(chunk[:n]))
        distinct += len({e["event_id"] for e in chunk[:n]})
        if n < len(chunk):
            break
    t1 = time.time()
    out.send(("done", {"t0": t0, "t1": t1, "sent": sent, "late_max": late, "refused": refused}))
    out.send(("oracle", (oracle, distinct, marks)))


# --- the stack ------------------------------------------------------------------------------


@dataclass
class Soak:
    """The run's stack, what the faults act on."""

    run: Run
    env: dict[str, str]
    broker: PrivateRedis
    sandbox: SandboxHandle
    ingest: Child
    flush: Child
    beat: Child
    dispatcher: Child
    engine: Engine
    database: str
    admin_dsn: str  # libpq URL of the store's server, for pg_terminate_backend
    pg: PrivatePostgres | None  # the store's own server, when pg_restart is in the list
    restarts: dict[str, int] = field(default_factory=lambda: {"ingest": 0, "flush": 0})
    killed_at: float | None = None  # the last SIGKILL: where a kill's recovery time starts

    def restart(self, child: Child, marker: str) -> None:
        """SIGKILL the process group (pool included), start it again, wait until ready."""
        offset = len(child.output())
        child.kill()
        self.killed_at = time.time()
        child.start().ready(marker, timeout=180, after=offset)


def private_store(run: Run) -> tuple[str, PrivatePostgres]:
    """A migrated database on a Postgres server of the run's own (safe to restart)."""
    pg = PrivatePostgres().start()
    run._stack.callback(pg.close)
    with psycopg.connect(pg.dsn, autocommit=True) as conn:
        conn.execute("CREATE DATABASE acc_soak")
    url = make_url(pg.url).set(database="acc_soak").render_as_string(hide_password=False)
    upgrade(url)
    return url, pg


def start_stack(run: Run, sandbox: SandboxHandle, private: bool) -> Soak:
    pg = None
    if private:
        url, pg = private_store(run)
    else:
        url = run.database()
    broker = PrivateRedis(run.tmp).start()
    run._stack.callback(broker.kill)  # the run owns it: stopped on every exit
    vba = {k: v for k, v in sandbox.env().items() if k.startswith("ACCUMSYNC_VBA_")}
    extra = SETTINGS | {"flush_queue": f"{run.tag}.flush"}
    env = run.env(url, broker_url=broker.url, **extra) | vba
    ingest = run.worker(env, 2, name="ingest", queues=[env["ACCUMSYNC_QUEUE"]])
    flush = run.worker(env, 4, name="flush", queues=[env["ACCUMSYNC_FLUSH_QUEUE"]])
    beat = run.beat(env)
    dispatcher = run.dispatcher(env)
    database = make_url(url).database
    assert database, url
    assert database.startswith("acc_"), database  # the run's own, nobody else's
    admin = pg.dsn if pg else PG_ADMIN
    engine = make_engine(url)
    return Soak(
        run, env, broker, sandbox, ingest, flush, beat, dispatcher, engine, database, admin, pg
    )


# --- faults -------------------------------------------------------------------------------------


@dataclass
class Fault:
    """One injected fault: when, what, and when ingest and flush were seen working after it."""

    name: str
    started: float
    detail: str = ""
    ended: float = 0.0
    ingest_resumed: float | None = None
    flush_resumed: float | None = None

    @property
    def recovered(self) -> float | None:
        if self.ingest_resumed is None or self.flush_resumed is None:
            return None
        return max(self.ingest_resumed, self.flush_resumed)

    def row(self, t0: float) -> dict[str, Any]:
        def since(t: float | None) -> str:
            return "never" if t is None else f"{t - self.ended:.1f}"

        return {
            "at_s": round(self.started - t0),
            "fault": self.name,
            "detail": self.detail,
            "fault_s": round(self.ended - self.started, 1),
            "ingest_resumed_s": since(self.ingest_resumed),
            "flush_resumed_s": since(self.flush_resumed),
            "recovered_s": since(self.recovered),
        }


def worker_kill(s: Soak, rng: random.Random, cap: float) -> str:
    kind = rng.choice(
        ["ingest worker", "flush worker", "ingest pool process", "flush pool process"]
    )
    child = s.ingest if kind.startswith("ingest") else s.flush
    if kind.endswith("worker"):
        s.restarts[child.name] += 1
        s.restart(child, " ready.")
        return f"SIGKILL {kind}, started again"
    os.kill(rng.choice(pool_pids(child.pid)), signal.SIGKILL)
    s.killed_at = time.time()
    return f"SIGKILL {kind}"


def beat_kill(s: Soak, rng: random.Random, cap: float) -> str:
    s.restart(s.beat, "beat: Starting")
    return "SIGKILL beat, started again"


def redis_kill(s: Soak, rng: random.Random, cap: float) -> str:
    s.broker.kill()
    time.sleep(3)
    s.broker.start()
    return "SIGKILL redis-server (appendonly, fsync always), started again after 3 s"


def pg_terminate(s: Soak, rng: random.Random, cap: float) -> str:
    killed, deadline = 0, time.monotonic() + 5
    with psycopg.connect(s.admin_dsn, autocommit=True) as conn:
        while time.monotonic() < deadline:
            killed += len(conn.execute(IN_TRANSACTION, (s.database,)).fetchall())
            time.sleep(0.02)
    return f"pg_terminate_backend every 0.02 s for 5 s: {killed} backends in a transaction"


def pg_restart(s: Soak, rng: random.Random, cap: float) -> str:
    assert s.pg is not None
    mode = rng.choice(["fast", "immediate"])
    s.pg.restart(mode)  # type: ignore[arg-type]
    what = "sessions rolled back" if mode == "fast" else "a crash: recovery from WAL"
    return f"Postgres server restarted (pg_ctl restart -m {mode}: {what})"


def vba_outage(s: Soak, rng: random.Random, cap: float) -> str:
    seconds = min(20.0, cap)
    if rng.random() < 0.5:
        s.sandbox.admin.set_faults(error_500=1.0)
        what = "500 on every call"
    else:
        s.sandbox.admin.set_faults(rate_429=1.0, retry_after=2)
        what = "429 on every call (logins too), Retry-After 2"
    time.sleep(seconds)
    s.sandbox.admin.set_faults(error_500=0.0, rate_429=0.0, retry_after=1)
    return f"VBA {what} for {seconds:.0f} s"


def two_beats(s: Soak, rng: random.Random, cap: float) -> str:
    seconds = min(60.0, cap)
    argv = list(s.beat.argv)
    argv[argv.index("-s") + 1] = str(s.run.tmp / "beat2-schedule")
    second = Child("beat2", argv, s.env, s.run.tmp / "logs" / "beat2.log").start()
    s.run.children.append(second)
    second.ready("beat: Starting", timeout=60)
    time.sleep(seconds)
    s.run.stop(second)
    return f"a second beat for {seconds:.0f} s"


INJECT = {
    f.__name__: f
    for f in (worker_kill, beat_kill, redis_kill, pg_terminate, pg_restart, vba_outage, two_beats)
}


def first_after(engine: Engine, at: float) -> tuple[float | None, float | None]:
    """The first ingest batch and the first successful batch call to VBA after ``at``."""
    when = datetime.fromtimestamp(at, UTC)
    b, f = IngestBatch, FlushAttempt
    ingest = select(func.min(col(b.at))).where(col(b.at) > when)
    ok = (col(f.outcome) == "ok") & col(f.pair_id).is_not(None) & (col(f.started_at) > when)
    flush = select(func.min(col(f.started_at))).where(ok)
    with engine.connect() as conn:
        i, fl = conn.execute(ingest).scalar(), conn.execute(flush).scalar()
    return (i.timestamp() if i else None), (fl.timestamp() if fl else None)


class Injector:
    """One fault every ``every`` seconds from ``t0`` until ``until``; each waits for its
    recovery (at most ``patience`` s) before the next may start."""

    def __init__(
        self, soak: Soak, names: list[str], every: float, t0: float, until: float, seed: int
    ):
        self.soak, self.names, self.every, self.t0, self.until = soak, names, every, t0, until
        self.rng = random.Random(seed)
        self.bag: list[str] = []
        self.faults: list[Fault] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.error: str | None = None

    def draw(self) -> str:
        """The next fault: the list shuffled, drawn from until empty, then shuffled again (in a
        30-minute run every fault comes 4 or 5 times; a plain random choice can miss one)."""
        if not self.bag:
            self.bag = self.rng.sample(self.names, len(self.names))
        return self.bag.pop()

    def _run(self) -> None:
        try:
            self._loop()
        except Exception as exc:  # reported, and the run fails: never a silent stop
            self.error = f"{type(exc).__name__}: {exc}"

    def _loop(self) -> None:
        next_at = self.t0 + self.every
        while next_at < self.until and not self.stop.wait(max(0.0, next_at - time.time())):
            fault = Fault(self.draw(), time.time())
            self.soak.killed_at = None
            self.faults.append(fault)
            fault.detail = INJECT[fault.name](self.soak, self.rng, 0.75 * self.every)
            fault.ended = self.soak.killed_at or time.time()  # a kill: its restart is recovery
            self._recovery(fault, patience=max(120.0, 2 * self.every))
            print(f"[{now_iso()}] {fault.row(self.t0)}", file=sys.stderr, flush=True)
            next_at = max(next_at + self.every, time.time() + 1)

    def _recovery(self, fault: Fault, patience: float) -> None:
        deadline = time.time() + patience
        while fault.recovered is None and time.time() < deadline and not self.stop.is_set():
            with contextlib.suppress(Exception):  # a Postgres blip of our own: ask again
                fault.ingest_resumed, fault.flush_resumed = first_after(
                    self.soak.engine, fault.ended
                )
            time.sleep(0.5)


# --- figures while it runs ----------------------------------------------------------------------


def worker_rss(pid: int) -> float | None:
    """RSS in MB of a worker: its main process and its pool (None while it restarts)."""
    try:
        return round(sum(rss_mb(p)[0] for p in [pid, *pool_pids(pid)]), 1)
    except (OSError, KeyError):
        return None


def queue_length(client: redis.Redis, queue: str) -> int:
    keys = [queue] + [f"{queue}{PRIORITY_SEP}{p}" for p in (3, 6, 9)]
    return sum(int(client.llen(k)) for k in keys)


def recorded(engine: Engine) -> int:
    """Events the workers recorded (each message's events, redeliveries included)."""
    with engine.connect() as conn:
        return int(
            conn.execute(select(func.coalesce(func.sum(IngestBatch.received), 0))).scalar_one()
        )


def waiting(engine: Engine) -> int:
    with Session(engine) as session:
        return waiting_for_flush(session)[0]


class Sampler:
    """Every 5 s: each worker's RSS, the ingest queue, accumulators waiting, events recorded."""

    def __init__(self, soak: Soak, published: Any) -> None:
        self.soak, self.published = soak, published
        self.redis = redis.Redis.from_url(
            soak.broker.url, socket_timeout=2, socket_connect_timeout=2
        )
        self.samples: list[dict[str, Any]] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        next_at = time.time()
        while not self.stop.wait(max(0.0, next_at - time.time())):
            self.samples.append(self.sample())
            next_at += SAMPLE_EVERY
            if len(self.samples) % 12 == 1:  # a line a minute: the run is alive
                print(f"[{now_iso()}] {self.samples[-1]}", file=sys.stderr, flush=True)

    def sample(self) -> dict[str, Any]:
        s = self.soak
        out: dict[str, Any] = {"t": round(time.time(), 2), "published": self.published.value}
        out["load_1m"] = os.getloadavg()[0]  # the machine's, other work included
        out["rss_ingest_mb"] = worker_rss(s.ingest.pid)
        out["rss_flush_mb"] = worker_rss(s.flush.pid)
        out["ingest_queue_msgs"] = guarded(
            lambda: queue_length(self.redis, s.env["ACCUMSYNC_QUEUE"])
        )
        out["waiting_accumulators"] = guarded(lambda: waiting(s.engine))
        out["recorded"] = guarded(lambda: recorded(s.engine))
        return out


def guarded(read: Any) -> Any:
    """A figure, or None when its service is the one down right now."""
    try:
        return read()
    except Exception:
        return None


def probe(n: int) -> dict[str, Any]:
    """The n-th probe: a new claim of 1.00 on the probe key; after n probes its total is n."""
    return {
        "event_id": f"probe-{n}",
        "claim_id": f"probe-{n}",
        "version": 0,
        "status": "adjudicated",
        "subscriber_id": PROBE_SUBSCRIBER,
        "group_id": PROBE_GROUP,
        "plan_year": "2026",
        "plan_type": "MED",
        "benefit_code": "PROBE",
        "network": "in",
        "amounts": {"allowed": "1.00"},
    }


class Probes:
    """Publishes a probe every 2 s; reads the sandbox's journal for the write that landed it."""

    def __init__(self, sandbox: SandboxHandle) -> None:
        self.sandbox = sandbox
        self.sent: list[float] = []  # publish time of probe n+1 at index n
        self.landed: dict[int, float] = {}  # probe number -> the journal's time of its write
        self.seq = 0
        self.stop = threading.Event()  # no more probes
        self.done = threading.Event()  # no more reading
        self.threads = [threading.Thread(target=t, daemon=True) for t in (self._send, self._read)]

    def start(self) -> None:
        for t in self.threads:
            t.start()

    def _send(self) -> None:
        from worker.ingest.producer import publish

        while not self.stop.wait(max(0.0, PROBE_EVERY - (time.time() - (self.sent or [0])[-1]))):
            at, n = time.time(), len(self.sent) + 1
            while True:
                try:
                    publish([probe(n)], 1)
                    break
                except Exception:  # the broker is down: it counts against freshness
                    time.sleep(0.5)
            self.sent.append(at)

    def _read(self) -> None:
        while not self.done.wait(1.0):
            for w in guarded(lambda: self.sandbox.admin.journal(since=self.seq)) or []:
                self.seq = max(self.seq, w["seq"])
                after = w.get("after") or {}
                if w["key"].get("subscriber_ID") == PROBE_SUBSCRIBER and after:
                    count = int(Decimal(str(after.get("allowed_Amt", 0))))
                    for n in range(1, count + 1):
                        self.landed.setdefault(n, float(w["at"]))

    def delays(self) -> list[tuple[float, float]]:
        """(publish time, seconds until VBA held it) of every probe that landed."""
        return [
            (at, self.landed[n + 1] - at) for n, at in enumerate(self.sent) if n + 1 in self.landed
        ]


def percentiles(values: list[float]) -> dict[str, Any]:
    if not values:
        return {"n": 0, "p50_s": None, "p95_s": None, "max_s": None}
    v = sorted(values)
    return {
        "n": len(v),
        "p50_s": round(statistics.median(v), 2),
        "p95_s": round(v[math.ceil(0.95 * len(v)) - 1], 2),  # nearest rank
        "max_s": round(v[-1], 2),
    }


# --- the end: drain, then the checks ------------------------------------------------------------


def distinct_recorded(engine: Engine) -> int:
    with engine.connect() as conn:
        return int(conn.execute(text("SELECT count(*) FROM received_event")).scalar_one())


#: Seconds the drain waits with nothing moving (queue empty, nothing waiting) before it says
#: something is missing: past the visibility timeout, kombu's restore sweep and a flush interval.
STALLED = 120.0


def drain(soak: Soak, sampler: Sampler, probes: Probes, distinct: int, timeout: float) -> bool:
    """Wait until every distinct event is recorded, nothing waits, every probe has landed;
    False after ``timeout``, or once nothing has moved for :data:`STALLED` seconds with the
    queue empty and nothing waiting (an event that will never come: lost)."""
    deadline, last, since = time.time() + timeout, None, time.time()
    queue = soak.env["ACCUMSYNC_QUEUE"]
    while time.time() < deadline:
        state = guarded(
            lambda: (
                distinct_recorded(soak.engine),
                waiting(soak.engine),
                queue_length(sampler.redis, queue),
                len(probes.landed),
            )
        )
        if state is not None:
            got, wait, queued, landed = state
            if got >= distinct and wait == queued == 0 and landed >= len(probes.sent):
                return True
            if state != last:
                last, since = state, time.time()
            elif wait == queued == 0 and time.time() - since > STALLED:
                return False
        time.sleep(2)
    return False


def lost(
    engine: Engine, distinct: int, probes: list[float], marks: list[tuple[float, str]]
) -> dict[str, Any]:
    """Distinct events published but never recorded: the stream's count, the probes' and the
    stream messages' publish times (a message counts as lost when the event only it carried
    is missing)."""
    with engine.connect() as conn:
        got = int(conn.execute(text("SELECT count(*) FROM received_event")).scalar_one())
        sql = text("SELECT event_id FROM received_event WHERE event_id LIKE 'probe-%'")
        seen = {int(str(e).removeprefix("probe-")) for (e,) in conn.execute(sql)}
        ids = [m for _, m in marks]
        sql = text("SELECT event_id FROM received_event WHERE event_id = ANY(:ids)")
        found = {str(e) for (e,) in conn.execute(sql, {"ids": ids})} if ids else set()
    return {
        "stream": distinct - (got - len(seen)),
        "probes": [(n + 1, at) for n, at in enumerate(probes) if n + 1 not in seen],
        "messages": [at for at, m in marks if m not in found],
    }


def stuck_and_dead(engine: Engine) -> dict[str, Any]:
    """What health and status would flag after the drain: work waiting or held, retries still
    pending, dead letters (each listed with its reason)."""
    with Session(engine) as session:
        count, oldest = waiting_for_flush(session)
        holds = held(session)
        open_dl = open_dead_letters(session)
        retrying = session.execute(
            select(func.count()).where(
                col(Pair.next_attempt_at).is_not(None) | col(Pair.last_error).is_not(None)
            )
        ).scalar_one()
        accum_retrying = session.execute(
            select(func.count()).where(
                (col(Accumulator.attempts) > 0) | col(Accumulator.next_attempt_at).is_not(None)
            )
        ).scalar_one()
        letters = [
            {
                "source": d.source,
                "kind": d.kind,
                "count": d.count,
                "event_id": d.event_id,
                "reason": d.reason[:200],
                "replayed": d.replayed_at is not None,
            }
            for d in session.exec(select(DeadLetter)).scalars()  # type: ignore[call-overload]
        ]
    return {
        "waiting": count,
        "oldest_waiting": str(oldest) if oldest else None,
        "held": holds,
        "open_dead_letters": open_dl,
        "pairs_with_retry_state": int(retrying),
        "accumulators_with_retry_state": int(accum_retrying),
        "dead_letters": letters,
    }


def rss_flat(samples: list[dict[str, Any]], t0: float, t1: float, name: str) -> dict[str, Any]:
    """Mean RSS of a worker over the run's first and last window (5 min, or a third of a
    shorter run)."""
    window = min(300.0, (t1 - t0) / 3)

    def mean(a: float, b: float) -> float | None:
        v = [x[f"rss_{name}_mb"] for x in samples if a <= x["t"] <= b and x[f"rss_{name}_mb"]]
        return round(statistics.fmean(v), 1) if v else None

    first, last = mean(t0, t0 + window), mean(t1 - window, t1)
    ratio = round(last / first, 3) if first and last else None
    return {"window_s": round(window), "first_mb": first, "last_mb": last, "ratio": ratio}


def freshness(probes: Probes, faults: list[Fault], patience: float) -> dict[str, Any]:
    """Percentiles over every probe, those whose life (publish until VBA held it) overlaps no
    fault's window (its start until its recovery) and those it overlaps."""
    windows = [(f.started, f.recovered or f.ended + patience) for f in faults]
    delays = probes.delays()

    def overlaps(at: float, delay: float) -> bool:
        return any(at <= b and a <= at + delay for a, b in windows)

    inside = [d for at, d in delays if overlaps(at, d)]
    outside = [d for at, d in delays if not overlaps(at, d)]
    return {
        "probes_sent": len(probes.sent),
        "probes_landed": len(delays),
        "all": percentiles([d for _, d in delays]),
        "outside_faults": percentiles(outside),
        "during_faults": percentiles(inside),
    }


# --- main ---------------------------------------------------------------------------------------


def arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--minutes", type=float, default=30.0, help="how long the stream runs")
    parser.add_argument("--rate", type=float, default=1_000, help="events/s offered")
    parser.add_argument("--fault-every", type=float, default=60.0, help="seconds between faults")
    parser.add_argument("--seed", type=int, default=1, help="the stream's and the faults' draw")
    parser.add_argument("--members", type=int, default=200, help="subscribers (one pair each)")
    parser.add_argument(
        "--faults", default=",".join(FAULTS), help=f"comma-separated subset of {','.join(FAULTS)}"
    )
    args = parser.parse_args()
    names = [n.strip() for n in args.faults.split(",") if n.strip()]
    unknown = sorted(set(names) - set(FAULTS))
    if unknown or not names:
        parser.error(f"--faults: unknown {unknown}; choose from {','.join(FAULTS)}")
    if args.minutes <= 0 or args.rate <= 0 or args.fault_every <= 0 or args.members < 1:
        parser.error("--minutes, --rate, --fault-every must be > 0 and --members >= 1")
    args.faults = names
    return args


def main() -> None:
    args = arguments()
    # A SIGTERM (``timeout``, a CI runner) unwinds like Ctrl-C: the workers, the servers and the
    # database go with the run instead of staying behind as orphans.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    seconds = args.minutes * 60
    report = Report("soak", vars(args) | {"settings": SETTINGS, "vba_rate": RATE, "batch": BATCH})
    ctx = mp.get_context("spawn")
    with (
        Run("soak") as run,
        running_sandbox(rate=RATE, burst=BURST, state=str(run.tmp / "vba.db")) as sandbox,
    ):
        soak = start_stack(run, sandbox, private="pg_restart" in args.faults)
        url = soak.env["ACCUMSYNC_DATABASE_URL"]
        producer_app(soak.env)
        published = ctx.Value("q", 0)
        receive, send = ctx.Pipe(duplex=False)
        pub = ctx.Process(
            target=publisher,
            args=(soak.env, args.rate, seconds, args.members, args.seed, published, send),
            daemon=True,
        )
        pub.start()
        try:
            t0 = expect(receive, pub, "started", 120)
            sampler = Sampler(soak, published)
            sampler.thread.start()
            probes = Probes(sandbox)
            probes.start()
            injector = Injector(soak, args.faults, args.fault_every, t0, t0 + seconds, args.seed)
            injector.thread.start()
            stats = expect(receive, pub, "done", seconds + 600)
            oracle, distinct, marks = expect(receive, pub, "oracle", 120)
            injector.thread.join()  # its last fault recovered (or given up on)
            probes.stop.set()
            probes.threads[0].join(30)
            drain_started = time.time()
            print(f"[{now_iso()}] drain ...", file=sys.stderr, flush=True)
            drained = drain(soak, sampler, probes, distinct + len(probes.sent), timeout=900)
            drained_at = time.time()
        finally:
            pub.terminate()
        probes.done.set()
        sampler.stop.set()
        sampler.thread.join(10)
        sampler.samples.append(sampler.sample())
        add_totals(oracle, expected_totals([probe(n) for n in range(1, len(probes.sent) + 1)]))
        store_diff = same_totals(Stack(run.tmp, database_url=url).totals(), oracle)
        vba_diff = same_totals(remote_totals(sandbox.admin.rows()), oracle)
        end = stuck_and_dead(soak.engine) | {
            "lost": lost(soak.engine, distinct, probes.sent, marks)
        }
        counters = sandbox.admin.counters()
        soak.engine.dispose()
    figures = {
        "publisher": stats,
        "distinct_events": distinct,
        "keys": len(oracle),
        "drained": drained,
        "drain_s": round(drained_at - drain_started, 1),
        "run_s": round(drained_at - t0, 1),
        "samples": sampler.samples,
        "after_last_publish_s": round(drained_at - stats["t1"], 1),
        "end": end,
        "vba_counters": counters,
        "worker_restarts": soak.restarts,
        "injector_error": injector.error,
        "rss": {w: rss_flat(sampler.samples, t0, stats["t1"], w) for w in ("ingest", "flush")},
        "freshness": freshness(probes, injector.faults, max(120.0, 2 * args.fault_every)),
    }
    judge(report, args, figures, injector.faults, t0, store_diff, vba_diff)
    extra = figures | {"store_diffs": store_diff[:20], "vba_diffs": vba_diff[:20]}
    extra |= {"faults": [f.__dict__ for f in injector.faults]}
    extra |= {"probes": [{"at": at, "delay_s": round(d, 3)} for at, d in probes.delays()]}
    save(report, extra)
    sys.exit(0 if all(t["met"] for t in report.targets) else 1)


def expect(receive: Connection, pub: Any, kind: str, timeout: float) -> Any:
    """The publisher's next message, which must be ``kind``."""
    deadline = time.time() + timeout
    while not receive.poll(1.0):
        if not pub.is_alive() or time.time() > deadline:
            raise RuntimeError(f"the publisher did not send {kind!r} (exit code {pub.exitcode})")
    got, value = receive.recv()
    if got != kind:
        raise RuntimeError(f"the publisher sent {got!r}, expected {kind!r}")
    return value


def judge(
    report: Report,
    args: argparse.Namespace,
    figures: dict[str, Any],
    faults: list[Fault],
    t0: float,
    store_diff: list[str],
    vba_diff: list[str],
) -> None:
    """The faults table, each check as a target, and the notes."""
    for f in faults:
        report.row(**f.row(t0))
    end, fresh, pub = figures["end"], figures["freshness"], figures["publisher"]
    report.target("store totals vs oracle, fields differing", len(store_diff), "0", not store_diff)
    report.target("VBA rows vs oracle, fields differing", len(vba_diff), "0", not vba_diff)
    report.target(
        "drained (all recorded, nothing waiting)", figures["drained"], "True", figures["drained"]
    )
    gone = end["lost"]["stream"] + len(end["lost"]["probes"])
    report.target("events lost (published, never recorded)", gone, "0", gone == 0)
    stuck = end["waiting"] + sum(end["held"].values())
    report.target("accumulators stuck (waiting or held after the drain)", stuck, "0", stuck == 0)
    letters = len(end["dead_letters"])
    report.target("dead letters (none expected from valid events)", letters, "0", letters == 0)
    lost = sum(f.recovered is None for f in faults) + (figures["injector_error"] is not None)
    report.target("faults without recovery", lost, "0", lost == 0)
    for name, rss in figures["rss"].items():
        ratio = rss["ratio"]
        report.target(
            f"{name} worker RSS, last / first window",
            ratio or 0.0,
            "<= 1.25",
            ratio is not None and ratio <= 1.25,
        )
    p95 = fresh["all"]["p95_s"]
    report.target("freshness p95, publish -> VBA (s)", p95 or 0.0, "reported", p95 is not None)
    achieved = pub["sent"] / (pub["t1"] - pub["t0"])
    report.target("events/s achieved / offered", round(achieved / args.rate, 3), "reported", True)
    report.note(
        f"offered {args.rate:,.0f} events/s for {args.minutes:g} min: published {pub['sent']:,} "
        f"({figures['distinct_events']:,} distinct, {figures['keys']:,} keys) in "
        f"{pub['t1'] - pub['t0']:.0f} s = {achieved:,.0f}/s; latest message "
        f"{pub['late_max']:.1f} s behind schedule; {pub['refused']} publishes refused (broker "
        f"down) and sent again; drained {figures['after_last_publish_s']:.0f} s after the last"
    )
    report.note(
        "freshness (publish -> VBA's journal shows the write): "
        + "; ".join(f"{k} {v}" for k, v in fresh.items())
    )
    report.note(f"RSS (MB, main + pool): {figures['rss']}; restarts {figures['worker_restarts']}")
    report.note(
        f"after the drain: waiting {end['waiting']}, held {end['held']}, open dead letters "
        f"{end['open_dead_letters']}, pairs with retry state {end['pairs_with_retry_state']}, "
        f"accumulators with retry state {end['accumulators_with_retry_state']}"
    )
    if gone:
        gone_at = end["lost"]["messages"] + [at for _, at in end["lost"]["probes"]]
        report.note(
            f"lost: {end['lost']['stream']} stream events ({len(end['lost']['messages'])} "
            f"whole messages) and {len(end['lost']['probes'])} probes, published at "
            + ", ".join(f"{at - t0:.1f} s" for at in sorted(gone_at))
            + " (compare with the faults' at_s)"
        )
    for d in end["dead_letters"]:
        report.note(f"dead letter: {d}")
    if figures["injector_error"]:
        report.note(f"fault injection stopped: {figures['injector_error']}")
    routes = figures["vba_counters"].get("by_route", {})
    calls = sum(routes.get("accumulators.batch", {}).values())
    seconds = figures["run_s"]
    loads = [x["load_1m"] for x in figures["samples"]]
    report.note(
        f"VBA: {calls:,} batch calls in {seconds:.0f} s = {calls / seconds:.1f}/s (the limit: "
        f"{RATE:.0f}/s); requests by status {figures['vba_counters'].get('by_status')}; the "
        f"machine's 1-minute load average (2 cores) mean {statistics.fmean(loads):.1f}, max "
        f"{max(loads):.1f}"
    )


def save(report: Report, extra: dict[str, Any]) -> Path:
    """Report.save (table printed, JSON written), the run's series added to the JSON."""
    path = report.save()
    for p in (path, RESULTS / "soak-latest.json"):
        payload = json.loads(p.read_text()) | extra
        p.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    return path


if __name__ == "__main__":
    main()
