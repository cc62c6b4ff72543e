"""``accumsync demo``: the whole pipeline on one machine, checked to the cent, then torn down.

It migrates a fresh store, starts the VBA sandbox, a worker, beat and the dispatcher as child
processes, publishes a realistic claim stream (duplicates, replacements, reversals, a few invalid
events), waits for the flushes, and compares every sandbox row with totals computed from the
stream by an independent oracle (``worker.demo.streams.expected_totals``). Every child is stopped
on the way out, also on Ctrl-C.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from models.buckets import VBA_FIELDS
from worker.demo.procs import (
    Child,
    ChildFailed,
    beat_argv,
    dispatch_argv,
    wait_for,
    worker_argv,
)
from worker.demo.sandboxes import free_port, sandbox_settings_kwargs
from worker.demo.streams import Key, StreamSpec, expected_totals, generate

INVALID = 6  # one of each kind the stream generator knows how to break
KEY_NAMES = ("subscriber_ID", "group_ID", "plan_Year", "plan_Type", "benefit_Code")


@dataclass
class Options:
    """What ``accumsync demo`` was asked to do."""

    events: int = 5_000
    members: int = 300
    broker_url: str = ""
    database_url: str = ""
    home: Path | None = None
    keep: bool = False
    flush_interval: float = 2.0
    timeout: float = 600.0
    seed: int = 7


@dataclass
class Figures:
    """What the run measured, for the summary."""

    published_s: float = 0.0
    ingested_s: float = 0.0
    flushed_s: float = 0.0
    status: dict[str, Any] = field(default_factory=dict)
    flush: dict[str, int] = field(default_factory=dict)
    items: dict[str, int] = field(default_factory=dict)
    vba_calls: dict[str, dict[str, int]] = field(default_factory=dict)
    keys: int = 0
    mismatches: list[str] = field(default_factory=list)


def child_env(opts: Options, home: Path, sandbox_url: str) -> dict[str, str]:
    """The environment every process of the demo shares; the user's ACCUMSYNC_* are ignored."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ACCUMSYNC_")}
    vba = sandbox_settings_kwargs(sandbox_url, {})
    env.update({f"ACCUMSYNC_{k.upper()}": _plain(v) for k, v in vba.items() if k.startswith("vba")})
    env.update(
        ACCUMSYNC_HOME=str(home),
        ACCUMSYNC_QUEUE=f"demo-{uuid.uuid4().hex[:8]}",
        ACCUMSYNC_BROKER_URL=opts.broker_url,
        ACCUMSYNC_DATABASE_URL=opts.database_url,
        ACCUMSYNC_FLUSH_INTERVAL=str(opts.flush_interval),
        ACCUMSYNC_BACKOFF_MAX="10",
        PYTHONUNBUFFERED="1",
    )
    if log_format := os.environ.get("ACCUMSYNC_LOG_FORMAT"):
        env["ACCUMSYNC_LOG_FORMAT"] = log_format
    return env


def _plain(value: Any) -> str:
    secret = getattr(value, "get_secret_value", None)
    return str(secret() if secret else value)


def adopt(env: dict[str, str]) -> None:
    """Make this process use the demo's settings too (it publishes and reads the store)."""
    from worker.celery import configure
    from worker.db import reset_engine
    from worker.settings import get_settings

    for key in [k for k in os.environ if k.startswith("ACCUMSYNC_")]:
        del os.environ[key]
    os.environ.update({k: v for k, v in env.items() if k.startswith("ACCUMSYNC_")})
    get_settings.cache_clear()
    configure(get_settings())
    reset_engine()


def valid_events(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The events the generator did not break on purpose (it names those ``bad-*``)."""
    return [e for e in events if not str(e["event_id"]).startswith("bad-")]


def compare(rows: list[dict[str, Any]], expected: dict[Key, dict[str, Decimal]]) -> list[str]:
    """Differences between VBA's rows and the expected totals, a missing row counting as 0."""
    remote: dict[tuple[str, ...], dict[str, Decimal]] = {
        tuple(r[k] for k in KEY_NAMES): {f: Decimal(str(r.get(f, 0))) for f in VBA_FIELDS}
        for r in rows
    }
    diffs: list[str] = []
    wanted: dict[tuple[str, ...], dict[str, Decimal]] = {k: v for k, v in expected.items()}
    for key in sorted(set(remote) | set(wanted)):
        mine, theirs = wanted.get(key, {}), remote.get(key, {})
        for f in VBA_FIELDS:
            if mine.get(f, Decimal(0)) != theirs.get(f, Decimal(0)):
                diffs.append(f"accumulator #{len(diffs) + 1}: field {f} differs")
    return diffs


class Demo:
    """One run: ``run()`` returns the exit code; children are always stopped."""

    def __init__(self, opts: Options, console: Console) -> None:
        self.opts, self.out = opts, console
        self.home = opts.home or Path(tempfile.mkdtemp(prefix="accumsync-demo-"))
        self.children: list[Child] = []
        self.figures = Figures()

    def run(self) -> int:
        try:
            return self._run()
        finally:
            self.stop()

    def _run(self) -> int:
        from worker.db import upgrade
        from worker.ingest.producer import connect

        port = free_port()
        env = child_env(self.opts, self.home, f"http://127.0.0.1:{port}")
        adopt(env)
        self.out.print(f"home [bold]{self.home}[/bold], queue {env['ACCUMSYNC_QUEUE']}")
        upgrade()
        self.out.print("store migrated")
        connect()  # an unreachable broker is said now, not as a publish that never ends
        self._start_children(env, port)
        events = generate(
            StreamSpec(
                events=self.opts.events,
                members=self.opts.members,
                invalid=INVALID,
                seed=self.opts.seed,
            )
        )
        started = self._publish(events)
        self._wait_ingested(len(events), started)
        self._wait_flushed(started)
        self._verify(events, port)
        self._summary(len(events))
        return 0 if not self.figures.mismatches else 1

    # -- children ---------------------------------------------------------------------------

    def _start_children(self, env: dict[str, str], port: int) -> None:
        logs = self.home / "logs"
        sandbox_argv = [sys.executable, "-m", "worker.sandbox", "--port", str(port)]
        sandbox = self._child("sandbox", sandbox_argv, env, logs)
        url = f"http://127.0.0.1:{port}/_admin/health"
        if not wait_for(lambda: _answers(url) or not sandbox.alive(), 30, 0.1) or not _answers(url):
            raise ChildFailed(f"sandbox did not start:\n{sandbox.output()[-2000:]}")
        # Embedded SQLite: one worker process (one token, one rate-limit bucket, one writer).
        concurrency = 1 if not self.opts.database_url.startswith("postgresql") else 2
        argv = worker_argv("demo", concurrency)
        self._child("worker", argv, env, logs).ready(" ready.", timeout=90)
        beat = beat_argv(self.home / "beat-schedule")
        self._child("beat", beat, env, logs).ready("beat: Starting", timeout=60)
        self._child("dispatcher", dispatch_argv(), env, logs).ready("dispatching", timeout=60)
        pids = ", ".join(f"{c.name} {c.pid}" for c in self.children)
        self.out.print(
            f"started sandbox, worker, beat and dispatcher (pids: {pids}); logs in {logs}"
        )

    def _child(self, name: str, argv: list[str], env: dict[str, str], logs: Path) -> Child:
        child = Child(name, argv, env, logs / f"{name}.log")
        self.children.append(child)
        return child.start()

    def stop(self) -> None:
        """Stop beat, then the worker (warm shutdown), then the sandbox; remove a temp home."""
        for child in reversed(self.children):
            if child.alive():
                child.stop(grace=15)
        self.children.clear()
        if not self.opts.keep and self.opts.home is None:
            shutil.rmtree(self.home, ignore_errors=True)

    # -- the pipeline -----------------------------------------------------------------------

    def _publish(self, events: list[dict[str, Any]]) -> float:
        from worker.ingest.producer import publish

        started = time.monotonic()
        with self._progress("publishing") as advance:
            publish(events, on_batch=advance(len(events)))
        self.figures.published_s = time.monotonic() - started
        return started

    def _wait_ingested(self, total: int, started: float) -> None:
        def received() -> int:
            return int(self._status()["received"])

        with self._progress("ingesting ") as advance:
            step = advance(total)
            seen = 0
            deadline = time.monotonic() + self.opts.timeout
            while seen < total:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"only {seen} of {total} events ingested")
                self._check_children()
                now = received()
                step(now - seen)
                seen = now
                time.sleep(0.2) if seen < total else None
        self.figures.ingested_s = time.monotonic() - started

    def _wait_flushed(self, started: float) -> None:
        from worker.db import session_scope
        from worker.ops.flushwait import pending

        def left() -> int:
            with session_scope() as s:
                return pending(s)

        first = left()
        with self._progress("flushing  ") as advance:
            step = advance(first)
            done, deadline = 0, time.monotonic() + self.opts.timeout
            while (now := left()) > 0:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{now} accumulators still waiting for their flush")
                self._check_children()
                step(max(0, first - now - done))
                done = max(done, first - now)
                time.sleep(0.3)
            step(first - done)
        self.figures.flushed_s = time.monotonic() - started

    def _verify(self, events: list[dict[str, Any]], port: int) -> None:
        from worker.db import session_scope
        from worker.demo.sandboxes import SandboxAdmin
        from worker.ops.flushwait import summary
        from worker.ops.metrics import item_statuses

        admin = SandboxAdmin(f"http://127.0.0.1:{port}")
        try:
            rows, counts = admin.rows(), admin.counters()
        finally:
            admin.close()
        expected = expected_totals(valid_events(events))
        f = self.figures
        f.keys, f.mismatches = len(expected), compare(rows, expected)
        f.vba_calls = counts["by_route"]
        f.status = self._status()
        with session_scope() as s:
            f.flush = summary(s, _epoch())
            f.items = dict(item_statuses(s))

    def _summary(self, total: int) -> None:
        for line in summary_lines(self.figures, total):
            self.out.print(line)
        if self.opts.keep or self.opts.home is not None:
            self.out.print(f"kept {self.home} (store, broker, logs)")

    # -- helpers ----------------------------------------------------------------------------

    def _status(self) -> dict[str, Any]:
        from worker.db import session_scope
        from worker.ops.reports import status

        with session_scope() as s:
            return status(s)

    def _check_children(self) -> None:
        for child in self.children:
            if not child.alive():
                raise ChildFailed(f"{child.name} exited:\n{child.output()[-3000:]}")

    @contextmanager
    def _progress(self, label: str) -> Iterator[Callable[[int], Callable[[int], None]]]:
        columns = (TextColumn(label), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
        with Progress(*columns, console=self.out, transient=False) as progress:

            def advance(total: int) -> Callable[[int], None]:
                task = progress.add_task(label, total=total)
                return lambda n: progress.advance(task, n)

            yield advance


def summary_lines(f: Figures, total: int) -> list[str]:
    """The closing report: throughput, ledger outcomes, VBA calls, dead letters, the verdict."""
    s, fields = f.status, f.keys * len(VBA_FIELDS)
    rate = total / f.ingested_s if f.ingested_s else 0.0
    calls = sum(sum(codes.values()) for codes in f.vba_calls.values())
    routes = ", ".join(
        f"{route} {_by_status(codes)}" for route, codes in sorted(f.vba_calls.items())
    )
    dead_ingest = s["dead_letters"] - f.flush["dead_letters"]
    lines = [
        "",
        f"published {total} events in {f.published_s:.1f}s; all ingested after "
        f"{f.ingested_s:.1f}s ([bold]{rate:,.0f} events/s[/bold])",
        f"  applied {s['applied']}, duplicates {s['duplicate']}, stale {s['stale']}, "
        f"conflicts {s['conflict']}, invalid {s['invalid']}",
        f"flushed {s['accumulators']} accumulators over {s['pairs']} (subscriber, group) pairs; "
        f"all confirmed {f.flushed_s:.1f}s after the first publish",
        f"  batch calls {f.flush['batch_calls']}; 207 item outcomes {_by_status(f.items)}",
        f"  VBA calls {calls}: {routes}",
        f"dead letters: {dead_ingest} invalid events refused at ingest (see the reasons with "
        f"`accumsync dead-letters list`), {f.flush['dead_letters']} from flushes",
    ]
    if f.mismatches:
        lines.append(
            f"[red bold]NOT verified[/red bold]: {len(f.mismatches)} of {fields} fields differ "
            f"from the independent totals, e.g. {f.mismatches[0]}"
        )
    else:
        lines.append(
            f"[green bold]verified[/green bold]: {f.keys} accumulators x {len(VBA_FIELDS)} fields "
            "in VBA equal the independent totals to the cent"
        )
    return lines


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=1).status_code < 500
    except httpx.TransportError:
        return False


def _epoch() -> Any:
    from datetime import UTC, datetime

    return datetime(1970, 1, 1, tzinfo=UTC)


def _by_status(counts: dict[str, int]) -> str:
    return ", ".join(f"{n} x {code}" for code, n in sorted(counts.items())) or "none"
