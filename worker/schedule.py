"""Celery beat's schedule: every periodic task, why it runs, and when a late run is dropped.

Run exactly one ``celery -A worker beat``: two beats would double every entry. Each beat process
notes every scheduled flush it queued in the store (``beat_tick``, by the database's clock), so
``accumsync health`` can say when no beat runs, or two do. The beat records it, not the worker:
a flush_due that waits behind a backlog expires unrun, and a live beat must not look dead.

The Celery app reads the schedule, and every producer imports the app, so the store's modules
(SQLAlchemy, the tables) are imported where a beat uses them, not here: a producer's import of
``worker.ingest.producer`` loads no SQLAlchemy (tests/unit/test_import_effects.py).
"""

from __future__ import annotations

import os
import socket
from datetime import timedelta
from typing import Any

from celery.schedules import crontab
from celery.signals import after_task_publish, beat_init

from worker.logs import Log
from worker.settings import Settings

log = Log("beat")
FLUSH_DUE = "accumsync.flush_due"
#: Rows of beats silent this long are dropped when another beat ticks.
FORGET_AFTER = timedelta(days=7)
_beat: dict[str, str] = {}  # set in a beat process only: its id, ``host:pid``


def beat_schedule(settings: Settings) -> dict[str, dict[str, Any]]:
    """The entries, timed from the settings."""
    interval = settings.flush_interval
    entries: dict[str, dict[str, Any]] = {
        # Changed accumulators reach VBA within about one interval. A run still queued when the
        # next is due is dropped (expires): flush_due is idempotent, the next one covers it.
        "flush-due": {
            "task": "accumsync.flush_due",
            "schedule": interval,
            "options": {"expires": interval},
        },
    }
    if settings.audit_retention_days > 0:
        # The audit tables lose rows older than the retention, a chunk at a time; their totals
        # live on in the counters. Hourly keeps each run short; a late run is dropped.
        entries["prune"] = {
            "task": "accumsync.prune",
            "schedule": 3600.0,
            "options": {"expires": 3600},
        }
    if settings.reconcile_cron:
        # Every pair against VBA at ACCUMSYNC_RECONCILE_RATE, report only (no repair); a run
        # resumes where the last one stopped, so an entry that finds one running adds nothing.
        entries["reconcile"] = {
            "task": "accumsync.reconcile",
            "schedule": cron(settings.reconcile_cron),
            "options": {"expires": 3600},
        }
    return entries


def cron(spec: str) -> crontab:
    """A crontab line, ``minute hour day-of-month month day-of-week``, as Celery's schedule."""
    minute, hour, day_of_month, month, day_of_week = spec.split()
    return crontab(
        minute=minute,
        hour=hour,
        day_of_month=day_of_month,
        month_of_year=month,
        day_of_week=day_of_week,
    )


@beat_init.connect
def _i_am_beat(**_: Any) -> None:
    """This process runs beat (``celery beat``, or a worker's embedded ``-B``): name it. An
    embedded beat is a forked child: it must not share its parent's database connections."""
    from worker.db import reset_engine  # the store's modules load in beat, not in a producer

    _beat["id"] = beat_id()
    reset_engine()


def beat_id() -> str:
    """``host:pid`` of this process: two beats on one host differ by pid, a restart too."""
    return f"{socket.gethostname()[:100]}:{os.getpid()}"


@after_task_publish.connect
def _ticked(sender: str | None = None, **_: Any) -> None:
    """Beat queued a flush_due: note the tick. ``accumsync flush`` (no beat) is not a tick."""
    if sender == FLUSH_DUE and "id" in _beat:
        record_tick(_beat["id"])


def record_tick(beat: str) -> None:
    """Upsert this beat's row (first_at kept, last_at and ticks moved) in its own short
    transaction; never fails beat (a missed note must not stop the schedule)."""
    from worker.db import db_after, db_now, insert, session_scope
    from worker.store.tables import T_BEAT

    try:
        with session_scope() as s:
            now = db_now()
            stmt = insert(s, T_BEAT).values(beat=beat, first_at=now, last_at=now, ticks=1)
            moved = {"last_at": now, "ticks": T_BEAT.c.ticks + 1}
            s.execute(stmt.on_conflict_do_update(index_elements=["beat"], set_=moved))
            old = db_after(-FORGET_AFTER.total_seconds())
            s.execute(T_BEAT.delete().where(T_BEAT.c.last_at < old))
    except Exception as exc:
        log.warning("beat.tick_not_recorded", error=type(exc).__name__)
