"""What every benchmark shares: a private stack (queue, database, worker), a clock, the report.

A benchmark owns everything it starts: a fresh Postgres database, a queue named for the run, its
worker processes and sandbox. ``Run`` stops and drops them all on exit, even on Ctrl-C, and never
touches anything else on the shared Redis or Postgres (no FLUSHDB, never the ``test`` database).
"""

from __future__ import annotations

import json
import os
import platform
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, make_url, text

from tests.services import create_database, drop_database, ensure_postgres, ensure_redis
from worker.db import make_engine, upgrade
from worker.demo.procs import CELERY, Child, dispatch_argv

RESULTS = Path(__file__).resolve().parent / "results"
ROOT = Path(__file__).resolve().parent.parent


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


class Run:
    """One benchmark run's resources; use as a context manager."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.tag = f"bench-{name}-{uuid.uuid4().hex[:8]}"
        self._stack = ExitStack()
        self.tmp = Path(self._stack.enter_context(tempfile.TemporaryDirectory(prefix="acc-")))
        self.children: list[Child] = []

    def __enter__(self) -> Run:
        return self

    def __exit__(self, kind: object, *exc: object) -> None:
        if kind is not None:  # the logs go with the temp dir: show their tails first
            print(self.logs(), file=sys.stderr)
        for child in self.children:
            child.stop(grace=15)
        self._stack.close()

    def database(self) -> str:
        """A fresh, migrated Postgres database, dropped when the run ends."""
        ensure_postgres()
        name, url = create_database()
        self._stack.callback(drop_database, name)
        upgrade(url)
        return url

    def sqlite(self) -> tuple[str, str]:
        """(store URL, broker URL) of the embedded defaults, in this run's temp dir."""
        home = self.tmp / f"home-{uuid.uuid4().hex[:6]}"
        home.mkdir()
        url = f"sqlite:///{home / 'accumsync.db'}"
        upgrade(url)
        return url, f"sqla+sqlite:///{home / 'broker.db'}"

    def env(self, database_url: str, broker_url: str | None = None, **extra: str) -> dict[str, str]:
        """The environment of this run's processes: its own queue, store and broker."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("ACCUMSYNC_")}
        env.update(
            ACCUMSYNC_HOME=str(self.tmp / "home"),
            ACCUMSYNC_QUEUE=self.tag,
            ACCUMSYNC_DATABASE_URL=database_url,
            ACCUMSYNC_BROKER_URL=broker_url if broker_url is not None else ensure_redis(),
            ACCUMSYNC_LOG_LEVEL="WARNING",
            PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
        )
        env.update({f"ACCUMSYNC_{k.upper()}": v for k, v in extra.items()})
        return env

    def worker(
        self,
        env: dict[str, str],
        concurrency: int,
        include: Sequence[str] = (),
        name: str = "w",
        queues: Sequence[str] = (),
        pool: str = "prefork",
    ) -> Child:
        """``celery -A worker worker`` started and ready: on ``queues``, or without ``-Q`` on
        both of this run's queues (ingest, flush)."""
        node = f"{name}-{self.tag}@%h"
        argv = [*CELERY, "worker", "-n", node, "-c", str(concurrency), "-P", pool]
        argv += ["-l", "INFO", "--without-gossip", "--without-mingle"]
        argv += [a for mod in include for a in ("-I", mod)]
        argv += ["-Q", ",".join(queues)] if queues else []
        child = Child(name, argv, env, self.tmp / "logs" / f"{name}.log").start()
        self.children.append(child)
        return child.ready(" ready.", timeout=90)

    def beat(self, env: dict[str, str]) -> Child:
        """The one ``celery -A worker beat`` of this run."""
        argv = [*CELERY, "beat", "-l", "INFO", "-s", str(self.tmp / "beat-schedule")]
        child = Child("beat", argv, env, self.tmp / "logs" / "beat.log").start()
        self.children.append(child)
        return child.ready("beat: Starting", timeout=60)

    def dispatcher(self, env: dict[str, str]) -> Child:
        """The ``accumsync dispatch`` of this run, leading."""
        child = Child("dispatch", dispatch_argv(), env, self.tmp / "logs" / "dispatch.log").start()
        self.children.append(child)
        return child.ready("dispatching flushes", timeout=60)

    def stop(self, child: Child) -> None:
        child.stop(grace=15)
        self.children.remove(child)

    def logs(self) -> str:
        return "\n".join(c.output()[-3000:] for c in self.children)


def producer_app(env: dict[str, str]) -> Any:
    """This process's Celery app, pointed at a run's broker and queue (``env`` of ``Run.env``).

    ``worker.celery`` configures itself from the environment when first imported, which any
    ``worker`` import does; so the run's settings are applied again before anything is sent.
    """
    from worker.celery import app, configure
    from worker.settings import get_settings

    os.environ.update({k: v for k, v in env.items() if k.startswith("ACCUMSYNC_")})
    get_settings.cache_clear()
    configure(get_settings())
    # The app keeps the connection and producer pools of the broker it first sent to: forget
    # them, or a later phase on another broker (Redis, then the embedded one) sends to the old.
    # (Not closed: kombu's registry hands the same pools out again for the same broker.)
    app._pool = None  # type: ignore[attr-defined]
    if "amqp" in app.__dict__:
        app.amqp._producer_pool = None  # type: ignore[attr-defined]
    return app


def pool_pids(parent: int) -> list[int]:
    """The PIDs of a process's children (a prefork worker's pool), from /proc."""
    pids: list[int] = []
    for task in Path(f"/proc/{parent}/task").glob("*/children"):
        pids += [int(p) for p in task.read_text().split()]
    return sorted(pids)


def rss_mb(pid: int) -> tuple[float, float]:
    """(current RSS, peak RSS) of a process in MB, from /proc/PID/status."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0]) / 1024
    return round(fields["VmRSS"], 1), round(fields["VmHWM"], 1)


TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds a process has used so far (0 if it is gone), from /proc."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / TICK


def pids_named(*names: str) -> list[int]:
    """Every process whose command name is one of ``names`` (e.g. postgres, redis-server)."""
    found = []
    for comm in Path("/proc").glob("[0-9]*/comm"):
        try:
            if comm.read_text().strip() in names:
                found.append(int(comm.parent.name))
        except OSError:
            continue
    return found


class CpuMeter:
    """CPU seconds used by each part of the system between ``start()`` and ``stop()``.

    ``worker_pid`` (or each of ``workers``, named) counts as two parts: its pool (the processes
    it forked) and its main process (broker I/O). ``others`` are single processes (the sandbox),
    their children included. Postgres and Redis count every process of theirs (backends, WAL
    writer, checkpointer, the postmaster): work the run causes when nothing else runs on the
    machine meanwhile. Given the run's ``database_url``, Postgres leaves out the backends of
    every other database (another suite's tests on the same server), so only Redis, one process
    for every client, still counts whatever else uses it. ``services=()`` leaves both out (the
    embedded defaults use neither).
    """

    def __init__(
        self,
        worker_pid: int | None = None,
        *,
        workers: Mapping[str, int] | None = None,
        others: Mapping[str, int] | None = None,
        services: Sequence[str] = ("postgres", "redis"),
        database_url: str | None = None,
    ) -> None:
        self.workers = dict(workers or {})
        if worker_pid is not None:
            self.workers[""] = worker_pid
        self.others = dict(others or {})
        self.services = tuple(services)
        self.database_url = database_url
        self.before: dict[str, float] = {}
        self.used: dict[str, float] = {}
        self._pg_before: dict[int, float] = {}
        self._datname: dict[int, str] = {}
        #: CPU seconds of other databases' backends, left out of "postgres".
        self.foreign_postgres = 0.0
        #: "postgres" split: this database's backends, and the server's own processes
        #: (postmaster, WAL writer, checkpointer, background writer: shared with anything else).
        self.postgres_split: dict[str, float] = {}

    def sample(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for name, pid in self.workers.items():
            prefix = f"{name} worker" if name else "worker"
            out[f"{prefix} pool"] = sum(cpu_seconds(p) for p in pool_pids(pid))
            out[f"{prefix} main (broker I/O)"] = cpu_seconds(pid)
        for name, pid in self.others.items():
            out[name] = cpu_seconds(pid) + sum(cpu_seconds(p) for p in pool_pids(pid))
        if "redis" in self.services:
            out["redis"] = sum(cpu_seconds(p) for p in pids_named("redis-server"))
        return out

    def _postgres(self) -> dict[int, float]:
        """CPU seconds of every postgres process; notes which database each backend serves."""
        if self.database_url:
            self._datname |= backends(self.database_url)
        return {p: cpu_seconds(p) for p in pids_named("postgres")}

    def start(self) -> None:
        if "postgres" in self.services:
            self._pg_before = self._postgres()
        self.before = self.sample()

    def stop(self) -> dict[str, float]:
        after = self.sample()
        self.used = {k: after[k] - self.before[k] for k in after}
        if "postgres" in self.services:
            # Per process: one that ended meanwhile is left out rather than subtracted.
            pg = self._postgres()
            delta = {p: v - self._pg_before.get(p, 0.0) for p, v in pg.items()}
            ours = make_url(self.database_url).database if self.database_url else None
            split = {"backends": 0.0, "shared": 0.0, "other databases": 0.0}
            for pid, seconds in delta.items():
                db = self._datname.get(pid)
                part = "shared" if db is None else "backends" if db == ours else "other databases"
                split[part] += seconds
            if not self.database_url:  # nothing to tell them apart by
                split = {"backends": 0.0, "shared": sum(delta.values()), "other databases": 0.0}
            self.foreign_postgres = split.pop("other databases")
            self.postgres_split = split
            self.used["postgres"] = sum(split.values())
        return self.used


def backends(database_url: str) -> dict[int, str]:
    """The database each Postgres backend serves, by PID (asked through the ``postgres``
    database, so the question's own backend is another database's)."""
    from sqlalchemy import create_engine
    from sqlalchemy.pool import NullPool

    sql = text("SELECT pid, datname FROM pg_stat_activity WHERE datname IS NOT NULL")
    engine = create_engine(make_url(database_url).set(database="postgres"), poolclass=NullPool)
    try:
        with engine.connect() as conn:
            return {int(pid): str(db) for pid, db in conn.execute(sql)}
    finally:
        engine.dispose()


def wait_until(
    check: Callable[[], bool], timeout: float, interval: float = 0.05, what: str = ""
) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError(f"benchmark: {what or 'condition'} not reached in {timeout}s")
        time.sleep(interval)


def events_ingested(engine: Engine) -> int:
    """How many events the workers have committed and folded into the totals (the sum over the
    folded ``ingest_batch`` rows: a batch counts once its versions are in the totals)."""
    sql = "SELECT coalesce(sum(received), 0) FROM ingest_batch WHERE folded_at IS NOT NULL"
    with engine.connect() as conn:
        return int(conn.execute(text(sql)).scalar() or 0)


@contextmanager
def store(url: str) -> Iterator[Engine]:
    """An engine on a benchmark's store, disposed afterwards."""
    engine = make_engine(url)
    try:
        yield engine
    finally:
        engine.dispose()


@dataclass
class Report:
    """A benchmark's figures: rows of a table, targets met or not, written as JSON."""

    name: str
    params: dict[str, Any]
    rows: list[dict[str, Any]] = field(default_factory=list)
    targets: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def row(self, **values: Any) -> None:
        self.rows.append(values)

    def target(self, what: str, value: float, goal: str, met: bool) -> None:
        self.targets.append({"what": what, "value": value, "target": goal, "met": met})

    def note(self, text_: str) -> None:
        self.notes.append(text_)

    def table(self) -> str:
        """The rows and the targets as Markdown tables (bench/README.md pastes them as they are)."""
        out = [*markdown(self.rows), ""]
        out += markdown(
            [
                {
                    "figure": t["what"],
                    "value": t["value"],
                    "target": t["target"],
                    "met": "yes" if t["met"] else "NO",
                }
                for t in self.targets
            ]
        )
        return "\n".join(out + [""] + [f"- {n}" for n in self.notes])

    def save(self) -> Path:
        """Print the table and write ``bench/results/NAME-TIMESTAMP.json`` (and NAME-latest)."""
        print(self.table())
        RESULTS.mkdir(exist_ok=True)
        payload = {
            "benchmark": self.name,
            "at": now_iso(),
            "machine": {
                "cpus": os.cpu_count(),
                "python": platform.python_version(),
                "platform": platform.platform(),
            },
            "params": self.params,
            "rows": self.rows,
            "targets": self.targets,
            "notes": self.notes,
        }
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S")
        path = RESULTS / f"{self.name}-{stamp}.json"
        for p in (path, RESULTS / f"{self.name}-latest.json"):
            p.write_text(json.dumps(payload, indent=2, default=str) + "\n")
        print(f"\nwritten {path.relative_to(ROOT)}", file=sys.stderr)
        return path


def markdown(rows: list[dict[str, Any]]) -> list[str]:
    """Rows of dicts (same keys) as a Markdown table."""
    if not rows:
        return []
    heads = list(rows[0])
    lines = ["| " + " | ".join(heads) + " |", "|" + "---|" * len(heads)]
    lines += ["| " + " | ".join(fmt(r.get(h, "")) for h in heads) + " |" for r in rows]
    return lines


def fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:,.2f}" if abs(value) < 100 else f"{value:,.0f}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return str(value)
