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
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, text

from tests.services import create_database, drop_database, ensure_postgres, ensure_redis
from worker.db import make_engine, upgrade
from worker.demo.procs import CELERY, Child

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
        self, env: dict[str, str], concurrency: int, include: Sequence[str] = (), name: str = "w"
    ) -> Child:
        """``celery -A worker worker`` on this run's queues (ingest, flush), started and ready."""
        node = f"{name}-{self.tag}@%h"
        argv = [*CELERY, "worker", "-n", node, "-c", str(concurrency)]
        argv += ["-l", "INFO", "--without-gossip", "--without-mingle"]
        argv += [a for mod in include for a in ("-I", mod)]
        child = Child(name, argv, env, self.tmp / "logs" / f"{name}.log").start()
        self.children.append(child)
        return child.ready(" ready.", timeout=90)

    def beat(self, env: dict[str, str]) -> Child:
        """The one ``celery -A worker beat`` of this run."""
        argv = [*CELERY, "beat", "-l", "INFO", "-s", str(self.tmp / "beat-schedule")]
        child = Child("beat", argv, env, self.tmp / "logs" / "beat.log").start()
        self.children.append(child)
        return child.ready("beat: Starting", timeout=60)

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

    Postgres and Redis count every process of theirs (backends, WAL writer, checkpointer):
    all of it is work the run causes, as nothing else runs on the machine meanwhile.
    """

    def __init__(self, worker_pid: int) -> None:
        self.worker_pid = worker_pid
        self.before: dict[str, float] = {}
        self.used: dict[str, float] = {}

    def sample(self) -> dict[str, float]:
        pool = pool_pids(self.worker_pid)
        return {
            "worker pool": sum(cpu_seconds(p) for p in pool),
            "worker main (broker I/O)": cpu_seconds(self.worker_pid),
            "postgres": sum(cpu_seconds(p) for p in pids_named("postgres")),
            "redis": sum(cpu_seconds(p) for p in pids_named("redis-server")),
        }

    def start(self) -> None:
        self.before = self.sample()

    def stop(self) -> dict[str, float]:
        after = self.sample()
        self.used = {k: after[k] - self.before[k] for k in after}
        return self.used


def wait_until(
    check: Callable[[], bool], timeout: float, interval: float = 0.05, what: str = ""
) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError(f"benchmark: {what or 'condition'} not reached in {timeout}s")
        time.sleep(interval)


def events_ingested(engine: Engine) -> int:
    """How many events the workers have committed (the sum over ``ingest_batch`` rows)."""
    with engine.connect() as conn:
        return int(conn.execute(text("SELECT coalesce(sum(events), 0) FROM ingest_batch")).scalar())


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
        """The rows and the targets as Markdown tables (the README pastes them as they are)."""
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
