"""Chaos fixtures: stacks with fast retry timings, a private Redis, figures, and the leak scan.

Every scenario ends the same way (``Chaos.finish``): the sandbox's rows must equal totals computed
independently from the valid events, the figures go to ``tests/chaos/results/<scenario>.json``
(RELIABILITY.md's table is copied from them), and everything the run produced that a person or a
monitor could read (worker, beat and sandbox logs, CLI output, Celery events) is scanned for the
member data and secrets the run used.
"""

from __future__ import annotations

import json
import random
import re
import sqlite3
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest
import redis
from celery import Celery
from sqlalchemy import Engine, text
from sqlmodel import Session

from tests.stack import Stack, remote_totals, same_totals
from worker.celery import broker_of, transport_options
from worker.db import make_engine
from worker.demo.procs import Child, wait_for
from worker.demo.sandboxes import SandboxHandle, free_port, running_sandbox
from worker.demo.streams import expected_totals
from worker.ingest.producer import argsrepr
from worker.ops.flushwait import pending
from worker.ops.queries import outcomes

RESULTS = Path(__file__).parent / "results"

#: Sandbox credentials of the chaos runs: distinctive, so the leak scan cannot miss them.
API_KEY = "chaos-key-7f3a9c1e55d2"
PASSWORD = "chaos-pass-b81e40aa9d"

#: Fast timings: retries in a second, leases of 3 s, a dead worker's message back in ~10 s, a
#: write of unknown outcome settled 4 s after it left (its request gave up after at most 4 x 1 s).
FAST = {
    "flush_interval": "1",
    "flush_lease": "3",
    "vba_timeout": "1",
    "settle_grace": "4",
    "backoff_base": "0.1",
    "backoff_max": "1",
    "max_attempts": "1000",
    "broker_visibility_timeout": "8",
}

#: Amounts no generated stream produces by chance (the generator's amounts are random cents).
LOUD_AMOUNTS = ("12345.67", "9876.54", "31415.92")


def distinctive(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The same stream with ids and some amounts nobody else's test uses: greppable in a scan.

    Subscriber ``S0000042`` becomes ``XQ0000042``, group ``GRP003`` becomes ``GQZ003``; every
    7th claim's copay becomes one of :data:`LOUD_AMOUNTS` (a function of the event, so duplicate
    deliveries stay identical).
    """
    out = []
    for e in events:
        if not isinstance(e, dict) or "subscriber_id" not in e:
            out.append(e)
            continue
        e = dict(e, subscriber_id="XQ" + str(e["subscriber_id"])[1:])
        e["group_id"] = "GQZ" + str(e["group_id"])[3:]
        n = sum(map(ord, str(e.get("event_id"))))
        if n % 7 == 0 and e.get("status") == "adjudicated":
            e["amounts"] = dict(e["amounts"], copay=LOUD_AMOUNTS[n % 3])
        out.append(e)
    return out


def store_away(logs: str) -> dict[str, int]:
    """What the workers and beat said while the store was away: ingest retries, flush tasks that
    found no store, and beat ticks not noted in it."""
    return {
        "ingest_retries": logs.count("ingest.db_unavailable"),
        "flush_pair_store_away": logs.count("flush.db_unavailable task=flush_pair"),
        "flush_due_store_away": logs.count("flush.db_unavailable task=flush_due"),
        "beat_ticks_not_recorded": logs.count("beat.tick_not_recorded"),
    }


def needles(events: list[dict[str, Any]], sandbox: SandboxHandle | None) -> set[str]:
    """Values that must never be readable outside the store: member ids, amounts, secrets."""
    found: set[str] = {API_KEY, PASSWORD}
    for e in events:
        if isinstance(e, dict) and isinstance(e.get("subscriber_id"), str):
            found.update({e["subscriber_id"], str(e.get("group_id"))})
    found.update(LOUD_AMOUNTS)
    found.update(a.replace(".", "") for a in LOUD_AMOUNTS)  # the same amounts in cents
    if sandbox is not None:
        found.update(issued_tokens(sandbox))
    return {n for n in found if len(n) >= 6}


def operator_logs(stack: Stack, valid: list[dict[str, Any]], tmp: Path) -> dict[str, str]:
    """The logs (stderr, JSON lines) of ``reconcile`` over some of the run's pairs and of
    ``explain`` of one member. Their stdout is member data on purpose (the operator's terminal)
    and is not scanned, but it must hold it: proof the runs looked at the right members."""
    pairs = sorted({(e["subscriber_id"], e["group_id"]) for e in valid})[:10]
    listed = tmp / "reconcile-pairs.csv"
    listed.write_text("".join(f"{s},{g}\n" for s, g in pairs))
    env = {"ACCUMSYNC_LOG_FORMAT": "json"}
    # Stack.cli, not ChaosStack.cli: their stdout must not join the scanned CLI output.
    reconcile = Stack.cli(
        stack,
        "reconcile",
        "--pairs",
        str(listed),
        "--rate",
        "20",
        "--json",
        "--csv",
        str(tmp / "drift.csv"),
        env=env,
        check=False,
    )
    assert reconcile.returncode == 0, reconcile.stdout + reconcile.stderr
    assert json.loads(reconcile.stdout)["keys_checked"] > 0
    subscriber, group = pairs[0]
    explain = Stack.cli(stack, "explain", "--subscriber", subscriber, "--group", group, env=env)
    assert subscriber in explain.stdout
    return {"reconcile log": reconcile.stderr, "explain log": explain.stderr}


def issued_tokens(sandbox: SandboxHandle) -> set[str]:
    """Every id and refresh token the sandbox issued (read from its state file)."""
    path = sandbox.flags.get("state")
    if not path or not Path(path).exists():
        return set()
    with sqlite3.connect(path) as db:
        rows = db.execute("SELECT token, owner FROM tokens").fetchall()
    return {t for row in rows for t in row if isinstance(t, str) and len(t) >= 16}


#: A number with 3 or more decimals (a task's runtime, an epoch timestamp) is never money, which
#: has at most 2; its digits can still spell a needle's cents (``0.0047399360009876546s``).
NOT_MONEY = re.compile(r"\d+\.\d{3,}(?:e-?\d+)?")
#: A Celery task id (a UUID, on every line a task writes): never member data, yet its hex digits
#: can spell a needle's cents (``8f245000-...``).
TASK_ID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def leaks(texts: dict[str, str], values: set[str]) -> list[str]:
    """``where: value`` for each value found in each text (numbers that can't be money aside)."""
    scrubbed = {where: NOT_MONEY.sub("", TASK_ID.sub("", b)) for where, b in texts.items()}
    return [f"{where}: {v!r}" for where, body in scrubbed.items() for v in values if v in body]


class EventCapture:
    """Celery events (what Flower shows) of one queue's workers, captured in a thread."""

    def __init__(self, broker_url: str, queue: str) -> None:
        self.app = Celery("chaos-monitor", broker=broker_url, set_as_current=False)
        self.app.conf.broker_connection_retry_on_startup = True
        self.queue, self.events = queue, list[dict[str, Any]]()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> EventCapture:
        self._thread.start()
        return self

    def _keep(self, event: dict[str, Any]) -> None:
        if self.queue in str(event.get("hostname")) or event.get("queue") == self.queue:
            self.events.append(event)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                with self.app.connection() as conn:
                    recv = self.app.events.Receiver(conn, handlers={"*": self._keep})
                    for _ in recv.itercapture(limit=None, timeout=1.0, wakeup=False):
                        if self._stop.is_set():
                            return
            except Exception:  # broker blips and the idle timeout: listen again
                time.sleep(0.2)

    def stop(self) -> str:
        """Stop listening; every captured task event as JSON text, for the scan."""
        self._stop.set()
        self._thread.join(5)
        return "\n".join(json.dumps(e, default=str) for e in self.events)

    def task_events(self) -> int:
        return sum(str(e.get("type", "")).startswith("task-") for e in self.events)


def sized(client: redis.Redis, key: bytes) -> int:
    """A Redis key's length, whatever its type (0 for a plain value)."""
    raw = client.type(key)
    kind = raw.decode() if isinstance(raw, bytes) else str(raw)
    lengths = {"list": client.llen, "hash": client.hlen, "zset": client.zcard, "set": client.scard}
    return int(lengths[kind](key)) if kind in lengths else 0


class ChaosStack(Stack):
    """A Stack that keeps every CLI output and reads the store directly (no CLI round trips)."""

    def __init__(self, tmp: Path, **kwargs: Any) -> None:
        super().__init__(tmp, **kwargs)
        self.outputs: list[str] = []
        self._engine: Engine | None = None
        self._producer: Celery | None = None
        self.producer_url = ""  # the test's own publishing may bypass a relay under test

    def cli(
        self, *args: str, stdin: str | None = None, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        proc = super().cli(*args, stdin=stdin, check=check)
        self.outputs.append(f"$ accumsync {' '.join(args)}\n{proc.stdout}\n{proc.stderr}")
        return proc

    @property
    def engine(self) -> Engine:
        if self._engine is None:
            self._engine = make_engine(self.database_url)
        return self._engine

    def scalar(self, sql: str) -> int:
        """One number from the store, e.g. ``SELECT count(*) FROM received_event``."""
        with self.engine.connect() as conn:
            return int(conn.execute(text(sql)).scalar_one() or 0)

    def received(self) -> int:
        """Distinct events the store has recorded (each event_id once, however delivered)."""
        return self.scalar("SELECT count(*) FROM received_event")

    def unfolded(self) -> int:
        """Batches recorded and not folded into the totals yet."""
        return self.scalar("SELECT count(*) FROM ingest_batch WHERE folded_at IS NULL")

    def dead(self, source: str = "ingest") -> int:
        return self.scalar(f"SELECT count(*) FROM dead_letter WHERE source = '{source}'")

    def pending(self) -> int:
        """Accumulators still to flush, and batches still to fold into them, read straight from
        the store (the same queries as ``flush --wait``)."""
        with Session(self.engine) as session:
            return pending(session)

    def diagnosis(self, tail: int = 2500) -> str:
        """Where the events wait, for a failed wait's message: every process's last lines (the
        logs joined and cut at their end show only the last process started, beat), the store's
        batches not folded, and on Redis the queue's keys with their lengths and the
        unacknowledged messages."""
        parts = [
            f"--- {c.name} ({'alive' if c.alive() else 'exited'})\n{c.output()[-tail:]}"
            for c in self.children
        ]
        parts.append(f"--- store: {self.received()} events, {self.unfolded()} batches unfolded")
        parts.append(f"--- broker: {self.broker_state()}")
        return "\n".join(parts)

    def broker_state(self) -> str:
        """The queue's keys on Redis (waiting, taken, per priority) and the unacked hash."""
        url = self.producer_url or self.env["ACCUMSYNC_BROKER_URL"]
        if not url.startswith("redis"):
            return "not Redis"
        try:
            with redis.Redis.from_url(url, socket_timeout=2) as client:
                keys = sorted(client.scan_iter(match=f"*{self.queue}*", count=1000))
                sizes = {k.decode(): sized(client, k) for k in keys}
                sizes["unacked"] = client.hlen("unacked")
                return ", ".join(f"{k}={n}" for k, n in sizes.items())
        except redis.RedisError as exc:
            return f"unreadable ({type(exc).__name__})"

    def figures(self) -> dict[str, int]:
        """Every ingest outcome's count, read straight from the store (the one query)."""
        with Session(self.engine) as session:
            return outcomes(session)

    def send(self, events: list[Any], batch: int = 100) -> int:
        """Publish as the producer API does (same task, argsrepr), without a CLI start-up."""
        if self._producer is None:
            self._producer = Celery("chaos-producer", set_as_current=False)
            raw = self.producer_url or self.env["ACCUMSYNC_BROKER_URL"]
            url, transport = broker_of(raw)
            self._producer.conf.update(
                broker_url=url,
                broker_transport=transport,
                broker_transport_options=transport_options(raw),  # publisher confirms on AMQP
                broker_connection_retry_on_startup=True,
                task_serializer="json",
                task_send_sent_event=True,
            )
        with self._producer.producer_or_acquire() as producer:
            for i in range(0, len(events), batch):
                part = events[i : i + batch]
                self._producer.send_task(
                    "accumsync.ingest",
                    args=[part],
                    argsrepr=argsrepr(part),
                    kwargsrepr="{}",
                    queue=self.queue,
                    producer=producer,
                )
        return len(events)

    def trickle(self, events: list[Any], batch: int = 10, gap: float = 0.1) -> threading.Thread:
        """Publish ``events`` in messages of ``batch`` every ``gap`` seconds, in a thread (join
        it): a fault injected meanwhile finds ingest transactions open as well as flushes."""

        def run() -> None:
            for start in range(0, len(events), batch):
                self.send(events[start : start + batch], batch=batch)
                time.sleep(gap)

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        return thread

    def send_raw(self, argument: Any) -> None:
        """One ingest message whose argument is ``argument`` as is (not necessarily a list)."""
        self.send([], batch=1)  # sets up the producer
        assert self._producer is not None
        self._producer.send_task(
            "accumsync.ingest", args=[argument], argsrepr="(raw)", kwargsrepr="{}", queue=self.queue
        )

    def close(self) -> None:
        for child in self.children:  # disposable: no warm shutdown to wait for
            child.kill()
        if self._engine is not None:
            self._engine.dispose()
        if self._producer is not None:
            self._producer.close()


class PrivateRedis:
    """A redis-server of the test's own (port, dir, append-only file): safe to kill and restart."""

    def __init__(self, tmp: Path) -> None:
        self.port, self.dir = free_port(), tmp / "redis"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.url = f"redis://127.0.0.1:{self.port}/0"
        argv = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1"]
        argv += ["--dir", str(self.dir), "--appendonly", "yes", "--appendfsync", "always"]
        argv += ["--save", "", "--maxmemory-policy", "noeviction"]
        self.child = Child("redis", argv, {"PATH": "/usr/bin:/bin"}, tmp / "logs" / "redis.log")

    def start(self) -> PrivateRedis:
        offset = len(self.child.output())
        self.child.start().ready("Ready to accept connections", timeout=30, after=offset)
        return self

    def kill(self) -> None:
        """SIGKILL: no shutdown save; the append-only file (fsync always) is all that survives."""
        self.child.kill()


def sandbox_with_state(stack: ExitStack, tmp: Path, **flags: Any) -> SandboxHandle:
    """A sandbox with the chaos credentials, its state (rows, tokens) in a file."""
    flags = {"api_key": API_KEY, "password": PASSWORD, "state": str(tmp / "vba.db")} | flags
    return stack.enter_context(running_sandbox(**flags))


@pytest.fixture
def chaos(
    tmp_path: Path, pg_url: str, redis_url: str, request: pytest.FixtureRequest
) -> Iterator[Chaos]:
    """One scenario's world: sandbox, stacks, figures; everything stopped at teardown."""
    with ExitStack() as stack:
        world = Chaos(tmp_path, pg_url, redis_url, request.node.name, stack)
        try:
            yield world
        finally:
            for s in world.stacks:
                s.close()
            for r in world.redises:
                r.child.kill()


class Chaos:
    """Builds a scenario's parts and checks its end: exact totals, figures written, no leaks."""

    def __init__(self, tmp: Path, pg_url: str, redis_url: str, name: str, exits: ExitStack):
        self.tmp, self.pg_url, self.redis_url, self.name = tmp, pg_url, redis_url, name
        self.exits = exits
        self.stacks: list[ChaosStack] = []
        self.redises: list[PrivateRedis] = []
        self.sandbox: SandboxHandle | None = None
        self.started = time.monotonic()
        self.rng = random.Random(name)

    def vba(self, **flags: Any) -> SandboxHandle:
        self.sandbox = sandbox_with_state(self.exits, self.tmp, **flags)
        return self.sandbox

    def private_redis(self) -> PrivateRedis:
        redis = PrivateRedis(self.tmp).start()
        self.redises.append(redis)
        return redis

    def stack(
        self,
        broker_url: str | None = None,
        database_url: str | None = None,
        embedded: bool = False,
        **settings: str,
    ) -> ChaosStack:
        """A Postgres + Redis stack on the sandbox, migrated, with :data:`FAST` timings (the
        test's database unless ``database_url`` names another, e.g. a private server's);
        ``embedded``: the defaults instead, SQLite store and broker under the stack's home."""
        env = FAST | settings
        stack = ChaosStack(
            self.tmp / f"stack{len(self.stacks)}",
            database_url="" if embedded else database_url or self.pg_url,
            broker_url="" if embedded else broker_url or self.redis_url,
            **env,
        )
        if embedded:  # the test's own publishing goes to the same SQLite broker file
            stack.producer_url = f"sqla+sqlite:///{stack.tmp / 'home' / 'broker.db'}"
        self.stacks.append(stack)
        if self.sandbox is not None:
            stack.use_sandbox(self.sandbox.env())
        stack.migrate()
        return stack

    def drain(self, stack: ChaosStack, unique: int, timeout: float = 120) -> None:
        """Wait until every distinct event is recorded and nothing is left to flush."""
        assert wait_for(lambda: stack.received() >= unique, timeout, 0.5), (
            f"{stack.received()} of {unique} events recorded\n{stack.diagnosis()}"
        )
        assert wait_for(lambda: stack.pending() == 0, timeout, 0.5), (
            f"{stack.pending()} accumulators still pending\n{stack.diagnosis()}"
        )

    def finish(
        self,
        stack: ChaosStack,
        valid: list[dict[str, Any]],
        *,
        fault: str,
        injected: str,
        times: int,
        events_in: int,
        extra: dict[str, Any] | None = None,
        monitor: str = "",
        expected_plus: Callable[[dict[Any, Any]], dict[Any, Any]] | None = None,
        operators: bool = False,
    ) -> dict[str, Any]:
        """Compare VBA with the oracle, write the figures, scan for leaks; returns the figures."""
        assert self.sandbox is not None
        expected = expected_totals(valid)
        if expected_plus is not None:
            expected = expected_plus(expected)
        diffs = same_totals(remote_totals(self.sandbox.admin.rows()), expected)
        figures = stack.figures()
        result = {
            "scenario": self.name,
            "fault": fault,
            "injected": injected,
            "times": times,
            "events_in": events_in,
            "distinct_valid_events": len({e["event_id"] for e in valid}),
            "events_applied": figures["applied"],
            "duplicates": figures["duplicate"],
            "stale": figures["stale"],
            "invalid": figures["invalid"],
            "dead_letters_ingest": stack.dead("ingest"),
            "dead_letters_flush": stack.dead("flush"),
            "keys": len(expected),
            "remote_equals_expected": not diffs,
            "run_seconds": round(time.monotonic() - self.started, 1),
            "vba_calls": self.sandbox.admin.counters()["by_status"],
        } | (extra or {})
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / f"{self.name}.json").write_text(json.dumps(result, indent=2) + "\n")
        print(json.dumps(result))
        assert diffs == [], "\n".join(diffs[:20])
        texts = {f"log {c.name}": c.output() for s in self.stacks for c in s.children}
        texts |= {"sandbox log": self.sandbox.log_path.read_text(errors="replace")}
        texts |= {"cli": "\n".join(o for s in self.stacks for o in s.outputs)}
        texts |= {"celery events": monitor}
        if operators:
            texts |= operator_logs(stack, valid, stack.tmp)
        values = needles(valid, self.sandbox)
        found = leaks(texts, values)
        assert found == [], "leaked: " + "; ".join(found[:10])
        # The scan is not vacuous: the same needles are found where member data does belong.
        assert leaks({"events": json.dumps(valid)}, values)
        scan = {"bytes": sum(map(len, texts.values())), "values": len(values)}
        result["leak_scan"] = scan | {"sources": sorted(texts), "found": 0}
        (RESULTS / f"{self.name}.json").write_text(json.dumps(result, indent=2) + "\n")
        return result
