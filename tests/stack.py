"""A running accumsync stack for integration tests: env, CLI calls, workers, the store's rows."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from decimal import Decimal
from pathlib import Path
from typing import Any

from redis import Redis
from sqlalchemy import Connection, func, select, text

from models.buckets import BUCKETS, VBA_FIELDS
from tests.services import migrated
from worker.db import make_engine
from worker.demo.procs import Child, beat_argv, dispatch_argv, wait_for, worker_argv
from worker.demo.streams import Key
from worker.settings import Settings
from worker.store.tables import KEY_COLS, T_ACCUM, T_BATCH, T_DEAD
from worker.vba.auth import RedisTokenStore, store_prefix

ACCUMSYNC = str(Path(sys.executable).parent / "accumsync")


class Stack:
    """Processes sharing one environment: a store, a broker, a queue of their own."""

    def __init__(self, tmp: Path, database_url: str = "", broker_url: str = "", **env: str):
        self.tmp = tmp
        self.queue = f"q-{uuid.uuid4().hex[:10]}"
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("ACCUMSYNC_")}
        self.env.update(
            ACCUMSYNC_HOME=str(tmp / "home"),
            ACCUMSYNC_QUEUE=self.queue,
            ACCUMSYNC_DATABASE_URL=database_url,
            ACCUMSYNC_BROKER_URL=broker_url,
            PYTHONUNBUFFERED="1",
        )
        self.env.update({f"ACCUMSYNC_{k.upper()}": v for k, v in env.items()})
        self.children: list[Child] = []
        self.database_url = database_url or f"sqlite:///{tmp / 'home' / 'accumsync.db'}"

    def cli(
        self,
        *args: str,
        stdin: str | None = None,
        check: bool = True,
        env: dict[str, str] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run the real ``accumsync`` console script in this stack's environment (plus ``env``)."""
        proc = subprocess.run(
            [ACCUMSYNC, *args],
            env=self.env | (env or {}),
            input=stdin,
            capture_output=True,
            text=True,
            timeout=300,
        )
        if check and proc.returncode != 0:
            raise AssertionError(
                f"accumsync {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}"
            )
        return proc

    def migrate(self) -> None:
        """The store at the schema's head, as ``accumsync db upgrade`` leaves it (made from a
        template: tests/services.py ``migrated``)."""
        migrated(self.database_url)

    def status(self) -> dict[str, Any]:
        return dict(json.loads(self.cli("status", "--json").stdout))

    def publish(
        self, events: list[Any], wait: bool = True, env: dict[str, str] | None = None
    ) -> None:
        """``accumsync publish`` the events from a JSONL file; wait until all are received."""
        path = self.tmp / f"events-{uuid.uuid4().hex[:8]}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(e) + "\n" for e in events))
        received = self.items_received() if wait else 0
        self.cli("publish", str(path), env=env)
        if wait:
            done = lambda: self.items_received() >= received + len(events)  # noqa: E731
            assert wait_for(done, 120, 0.1), f"{len(events)} events not received in 120s"

    def items_received(self) -> int:
        """``status``'s ``received`` (every item of every message) of the batches already folded
        into the totals, read straight from the store: no CLI start per poll. A wait on it ends
        once what was received is in the totals too (a batch is folded just after its commit,
        by its worker's process within ``ACCUMSYNC_FOLD_DELAY``, or by whoever holds the fold)."""
        b = T_BATCH.c
        query = select(func.coalesce(func.sum(b.received), 0)).where(b.folded_at.is_not(None))
        with self.store() as conn:
            return int(conn.execute(query).scalar_one())

    def open_letters(self, source: str, containing: str = "") -> int:
        """Open dead letters of ``source`` (whose payload holds ``containing``), counted straight
        from the store: what a wait polls, with no CLI start (a second of CPU) per poll."""
        d = T_DEAD.c
        query = select(func.count()).where(d.source == source, d.replayed_at.is_(None))
        with self.store() as conn:
            return int(conn.execute(query.where(d.payload.contains(containing))).scalar_one())

    @contextmanager
    def store(self) -> Iterator[Connection]:
        """A connection to the stack's store, on an engine of its own (disposed after)."""
        engine = make_engine(self.database_url)
        try:
            with engine.connect() as conn:
                yield conn
        finally:
            engine.dispose()

    def flush_wait(self, timeout: int = 180, expect: int = 0) -> str:
        """``accumsync flush --wait``; asserts its exit code (0: nothing pending, no new dead
        letter; 1: new dead letters; 3: still pending)."""
        proc = self.cli("flush", "--wait", "--timeout", str(timeout), check=False)
        assert proc.returncode == expect, proc.stdout + proc.stderr + self.logs()[-4000:]
        return proc.stdout

    def worker(
        self,
        name: str = "w1",
        concurrency: int = 1,
        pool: str = "prefork",
        queue: str | None = None,
        **env: str,
    ) -> Child:
        """Start ``celery -A worker worker`` on this stack's two queues (or only ``queue``) and
        wait until it is ready."""
        argv = worker_argv(f"{name}-{self.queue}", concurrency, [queue] if queue else [], pool)
        log = self.tmp / "logs" / f"{name}.log"
        child = Child(name, argv, self.env | env, log).start()
        self.children.append(child)
        return child.ready(" ready.", timeout=90)

    def dispatcher(self, name: str = "dispatch", **env: str) -> Child:
        """Start ``accumsync dispatch`` and wait until it runs (leading or waiting)."""
        log = self.tmp / "logs" / f"{name}.log"
        child = Child(name, dispatch_argv(), self.env | env, log).start()
        self.children.append(child)
        return child.ready("dispatching flushes", timeout=60)

    def beat(self, name: str = "beat") -> Child:
        """Start ``celery -A worker beat`` (one per stack, unless a test means two)."""
        argv = beat_argv(self.tmp / f"{name}-schedule")
        child = Child(name, argv, self.env, self.tmp / "logs" / f"{name}.log").start()
        self.children.append(child)
        return child.ready("beat: Starting", timeout=60)

    def use_sandbox(self, env: dict[str, str]) -> None:
        """Point the stack's VBA settings at a sandbox (its ACCUMSYNC_VBA_* variables only)."""
        self.env.update({k: v for k, v in env.items() if k.startswith("ACCUMSYNC_VBA_")})
        self.forget_vba_token()

    def forget_vba_token(self) -> None:
        """Delete the fleet's shared token for this VBA from Redis. A sandbox knows no token when
        it starts, but one an earlier sandbox on the same port issued can still be in Redis
        under the same key: a worker would send it, be refused, try a refresh and log in, and a
        test counting VBA's calls would see calls it did not cause."""
        prefix = "ACCUMSYNC_"
        values = {k[len(prefix) :].lower(): v for k, v in self.env.items() if k.startswith(prefix)}
        settings = Settings(_env_file=None, **values)  # type: ignore[call-arg]
        if url := settings.effective_redis_url:
            with Redis.from_url(url) as redis:
                redis.delete(RedisTokenStore(redis, store_prefix(settings)).key)

    def logs(self) -> str:
        return "\n".join(c.output() for c in self.children)

    def close(self) -> None:
        for child in self.children:
            child.stop()

    def totals(self) -> dict[Key, dict[str, Decimal]]:
        """Our totals per key, as VBA field -> Decimal, read straight from the store."""
        with self.store() as conn:
            rows = conn.execute(select(T_ACCUM)).mappings().all()
        return {
            (
                r["subscriber_id"],
                r["group_id"],
                r["plan_year"],
                r["plan_type"],
                r["benefit_code"],
            ): {
                f: Decimal(r[c]) / 100
                for b in BUCKETS
                for f, c in zip(b.vba_fields, b.columns, strict=True)
            }
            for r in rows
        }


def remote_totals(rows: list[dict[str, Any]]) -> dict[Key, dict[str, Decimal]]:
    """VBA rows (wire dicts) as totals per key, VBA field -> Decimal; absent fields are 0."""
    return {
        (r["subscriber_ID"], r["group_ID"], r["plan_Year"], r["plan_Type"], r["benefit_Code"]): {
            f: Decimal(str(r.get(f, 0))) for f in VBA_FIELDS
        }
        for r in rows
    }


def same_totals(a: dict[Key, dict[str, Decimal]], b: dict[Key, dict[str, Decimal]]) -> list[str]:
    """Differences between two totals maps, a key missing on one side counting as all zero."""
    diffs = []
    for key in sorted(set(a) | set(b)):
        ra, rb = a.get(key, {}), b.get(key, {})
        for field in sorted(set(ra) | set(rb)):
            if ra.get(field, Decimal(0)) != rb.get(field, Decimal(0)):
                diffs.append(f"{key} {field}: {ra.get(field)} != {rb.get(field)}")
    return diffs


FULL = 2**63 - 1
"""The largest total a ``BIGINT`` column holds: any amount more is one the store must refuse."""


def plant_full_total(conn: Connection, event: Mapping[str, Any], column: str) -> None:
    """The pair and accumulator of ``event``'s key (canonical already), stored with ``column``
    at :data:`FULL`, as if folded long ago."""
    key = {k: event[k] for k in KEY_COLS}
    pair = conn.execute(
        text(
            "INSERT INTO pair (subscriber_id, group_id, attempts) VALUES (:subscriber_id,"
            " :group_id, 0) RETURNING id"
        ),
        key,
    ).scalar_one()
    conn.execute(
        text(
            "INSERT INTO accumulator (pair_id, subscriber_id, group_id, plan_year, plan_type,"
            f" benefit_code, change_seq, pushed_seq, attempts, held, {column})"
            " VALUES (:pair, :subscriber_id, :group_id, :plan_year, :plan_type, :benefit_code,"
            " 0, 0, 0, false, :full)"
        ),
        {"pair": pair, **key, "full": FULL},
    )
