"""A migration applied while workers ingest, and workers that are older (or newer) than the schema.

Today's workers are at the code's head, so to be "the previous revision" they need a schema one
step ahead of them: the test copies the packaged migrations and adds one realistic, additive
migration (a nullable column on the busiest table, then an index built CONCURRENTLY), applied
with alembic's own ``Config`` pointed at the copy. Production code has no setting for that.
"""

from __future__ import annotations

import shutil
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import redis
from alembic import command
from alembic.config import Config
from alembic.script import ScriptDirectory

from tests.chaos.conftest import Chaos, ChaosStack, distinctive
from worker.db import MIGRATIONS
from worker.demo.procs import Child, wait_for
from worker.demo.streams import StreamSpec, generate

pytestmark = pytest.mark.chaos

NEWER = "9001_chaos_source"

#: The newer release's migration. On Postgres: the ALTER may wait at most 5 s for its lock (a
#: long transaction must fail the migration, not queue every insert behind it), and the index
#: is built CONCURRENTLY, outside the transaction, so inserts go on while it is built.
MIGRATION = '''"""received_event.source, and an index on received_at (added by the chaos test)

Revision ID: {revision}
Revises: {down}
"""

import time

import sqlalchemy as sa
from alembic import context, op

revision = "{revision}"
down_revision = "{down}"
branch_labels = None
depends_on = None


def upgrade() -> None:
    marks = context.config.attributes.setdefault("marks", {{}})
    postgres = op.get_bind().dialect.name == "postgresql"
    if postgres:
        op.execute("SET LOCAL lock_timeout = '5s'")
    marks["alter_started"] = time.monotonic()
    op.add_column("received_event", sa.Column("source", sa.String(32), nullable=True))
    marks["alter_done"] = time.monotonic()
    with op.get_context().autocommit_block():  # commits: the ALTER's lock is released here
        marks["committed"] = time.monotonic()
        op.create_index(
            "ix_received_event_received_at", "received_event", ["received_at"],
            postgresql_concurrently=postgres,
        )
    marks["indexed"] = time.monotonic()


def downgrade() -> None:
    op.drop_index("ix_received_event_received_at", "received_event")
    op.drop_column("received_event", "source")
'''


def newer_schema(tmp: Path, url: str) -> Config:
    """Alembic on a copy of the packaged migrations plus :data:`MIGRATION` on top of the head."""
    copy = tmp / "newer-migrations"
    shutil.copytree(MIGRATIONS, copy, ignore=shutil.ignore_patterns("__pycache__"))
    head = ScriptDirectory(str(MIGRATIONS)).get_current_head()
    text = MIGRATION.format(revision=NEWER, down=head)
    (copy / "versions" / f"{NEWER}.py").write_text(text)
    cfg = Config()
    cfg.set_main_option("script_location", str(copy))
    cfg.set_main_option("sqlalchemy.url", url)
    return cfg


def refused(child: Child, timeout: float = 90) -> tuple[int, str, float]:
    """Start ``child`` again; its exit code, what it printed and how long it ran."""
    offset, started = len(child.output()), time.monotonic()
    child.start()
    assert child.proc is not None
    code = child.proc.wait(timeout)
    return code, child.output()[offset:], round(time.monotonic() - started, 2)


def assert_refused(code: int, said: str, expected: str) -> None:
    """A non-zero exit with ``expected`` said, no traceback, and never ready to consume."""
    assert code != 0, said
    assert expected in said, said
    assert "Traceback" not in said and " ready." not in said, said


def test_migration_under_ingest_then_workers_older_than_the_schema_refuse(chaos: Chaos) -> None:
    """An additive migration to a newer head mid-stream loses nothing; a worker restarted after
    it (older than the schema) refuses and consumes nothing; on a store one revision behind
    today's head a worker refuses too, until `accumsync db upgrade`, and then everything lands."""
    chaos.vba()
    stack = chaos.stack()
    real_head = ScriptDirectory(str(MIGRATIONS)).get_current_head()
    broker = redis.Redis.from_url(chaos.redis_url)
    events = distinctive(generate(StreamSpec(events=1_000, members=40, seed=61)))
    waves = [events[i::8] for i in range(8)]
    w1, w2 = started_together(stack, beat=True)

    # (a) Waves of ingest; the newer release's migration runs during the third.
    newer = newer_schema(chaos.tmp, chaos.pg_url)
    timing: dict[str, float] = {}
    migrate = threading.Thread(target=lambda: timed_upgrade(newer, stack, timing), daemon=True)
    for i, wave in enumerate(waves[:6]):
        stack.send(wave, batch=25)
        if i == 2:
            migrate.start()
        time.sleep(0.4)
    migrate.join(60)
    assert "done" in timing, "the migration did not finish"
    first = len({e["event_id"] for w in waves[:6] for e in w})
    # Recorded and folded: the downgrade below refuses while a batch waits for its fold (0014),
    # and once the workers stop nothing folds (CI's ci95 stopped them between the two).
    settled = lambda: stack.received() >= first and stack.unfolded() == 0  # noqa: E731
    assert wait_for(settled, 120, 0.3), stack.logs()[-3000:]

    # A worker restarted now is older than the schema: it refuses, and consumes nothing.
    w1.stop()
    w2.stop()
    stack.send(waves[6], batch=25)
    depth, received = broker.llen(stack.queue), stack.received()
    assert depth > 0
    code_newer, said_newer, ran_newer = refused(w2)
    assert_refused(
        code_newer,
        said_newer,
        f"this accumsync knows schema up to {real_head}; the store is at {NEWER}, "
        "written by a newer accumsync: upgrade this worker",
    )
    assert (broker.llen(stack.queue), stack.received()) == (depth, received)
    # Nor can this release's `db upgrade` touch it (alembic alone would say "can't locate").
    upgrade_newer = stack.cli("db", "upgrade", check=False)
    assert upgrade_newer.returncode == 4, upgrade_newer.stdout + upgrade_newer.stderr
    assert upgrade_newer.stderr.startswith(f"this accumsync knows schema up to {real_head}")

    # (b) The store one revision behind today's head: today's worker refuses, naming the fix.
    previous = ScriptDirectory(str(MIGRATIONS)).get_revision(real_head).down_revision
    assert isinstance(previous, str)
    command.downgrade(newer, previous)
    code_behind, said_behind, ran_behind = refused(w2)
    assert_refused(code_behind, said_behind, "run `accumsync db upgrade`")
    assert (broker.llen(stack.queue), stack.received()) == (depth, received)

    # `accumsync db upgrade` while the producer keeps publishing; then the worker starts.
    publishing = threading.Thread(target=lambda: trickle(stack, waves[7]), daemon=True)
    publishing.start()
    started = time.monotonic()
    stack.cli("db", "upgrade")
    upgrade_seconds = time.monotonic() - started
    publishing.join(30)
    upgraded = time.monotonic()
    w2.start().ready(" ready.", timeout=90)
    chaos.drain(stack, len({e["event_id"] for e in events}), timeout=120)
    recovered = time.monotonic() - upgraded
    chaos.finish(
        stack,
        events,
        fault="migration applied under ingest; workers older and newer than the schema",
        injected=f"an additive migration ({NEWER}: nullable column + index built CONCURRENTLY "
        "on received_event) applied mid-stream under 2 workers; a worker restarted on it; the "
        f"store downgraded to {previous}, a worker started, `accumsync db upgrade` under publish",
        times=3,
        events_in=len(events),
        extra={
            "migration_seconds": round(timing["done"] - timing["start"], 3),
            "alter_lock_held_seconds": round(timing["committed"] - timing["alter_started"], 3),
            "alter_seconds": round(timing["alter_done"] - timing["alter_started"], 3),
            "index_concurrently_seconds": round(timing["indexed"] - timing["committed"], 3),
            "events_recorded_during_migration": int(timing["received_after"])
            - int(timing["received_before"]),
            "refused_newer_schema": {
                "exit": code_newer,
                "seconds_to_exit": ran_newer,
                "line": last_line(said_newer),
            },
            "refused_behind_schema": {
                "exit": code_behind,
                "seconds_to_exit": ran_behind,
                "line": last_line(said_behind),
            },
            "messages_left_queued_while_refused": depth,
            "db_upgrade_under_publish_seconds": round(upgrade_seconds, 2),
            "recovery_seconds_upgrade_to_all_flushed": round(recovered, 1),
        },
    )


def started_together(stack: ChaosStack, beat: bool) -> tuple[Child, Child]:
    """Two workers (2 and 1 processes) and beat, started at once (their start-ups overlap)."""
    workers: dict[str, Child] = {}
    starts = [
        threading.Thread(target=lambda n=n, c=c: workers.update({n: stack.worker(n, c)}))
        for n, c in (("w1", 2), ("w2", 1))
    ]
    for thread in starts:
        thread.start()
    if beat:
        stack.beat()
    for thread in starts:
        thread.join(120)
    return workers["w1"], workers["w2"]


def timed_upgrade(cfg: Config, stack: ChaosStack, timing: dict[str, float]) -> None:
    """``alembic upgrade head`` on ``cfg``, with the migration's own marks copied out and the
    events recorded just before and just after it."""
    timing["received_before"] = stack.received()
    timing["start"] = time.monotonic()
    command.upgrade(cfg, "head")
    timing["done"] = time.monotonic()
    timing["received_after"] = stack.received()
    timing.update(cfg.attributes.get("marks", {}))


def trickle(stack: ChaosStack, events: list[dict[str, Any]]) -> None:
    """Publish ``events`` in four parts a quarter of a second apart."""
    for i in range(4):
        stack.send(events[i::4], batch=25)
        time.sleep(0.25)


def last_line(said: str) -> str:
    lines = [line for line in said.splitlines() if line.strip()]
    return lines[-1] if lines else ""
