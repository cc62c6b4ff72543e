"""Celery beat's schedule: every periodic task, why it runs, and when a late run is dropped.

Run exactly one ``celery -A worker beat``: two beats would double every entry.
"""

from __future__ import annotations

from typing import Any

from celery.schedules import crontab

from worker.settings import Settings


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
    return crontab(minute=minute, hour=hour, day_of_month=day_of_month, month_of_year=month,
                   day_of_week=day_of_week)  # fmt: skip
