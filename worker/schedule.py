"""Celery beat's schedule: every periodic task, why it runs, and when a late run is dropped.

Run exactly one ``celery -A worker beat``: two beats would double every entry.
"""

from __future__ import annotations

from typing import Any

from worker.settings import Settings


def beat_schedule(settings: Settings) -> dict[str, dict[str, Any]]:
    """The entries, timed from the settings."""
    interval = settings.flush_interval
    return {
        # Changed accumulators reach VBA within about one interval. A run still queued when the
        # next is due is dropped (expires): flush_due is idempotent, the next one covers it.
        "flush-due": {
            "task": "accumsync.flush_due",
            "schedule": interval,
            "options": {"expires": interval},
        },
    }
