"""``accumsync flush --wait``: trigger flushes and wait until nothing is left, then summarize."""

from __future__ import annotations

import json
import time
from collections import Counter
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import func, select
from sqlmodel import Session

from worker.celery import app
from worker.db import session_scope, utcnow
from worker.ops.queries import waiting_for_flush, waiting_for_fold
from worker.store.tables import T_ATTEMPT, T_DEAD

RETRIGGER_EVERY = 5.0  # seconds: retries whose time has come are picked up without beat


def pending(session: Session) -> int:
    """Accumulators still to flush (:func:`worker.ops.queries.waiting_for_flush`), and batches
    still to fold into them (each counts one: the flush that follows its fold is still to come)."""
    return waiting_for_flush(session)[0] + waiting_for_fold(session)


def summary(session: Session, since: datetime) -> dict[str, int]:
    """Batch calls, 207 item statuses and new flush dead letters since ``since``."""
    f, d = T_ATTEMPT.c, T_DEAD.c
    attempts = session.execute(select(f.statuses, f.outcome).where(f.started_at >= since)).all()
    statuses: Counter[str] = Counter()
    for raw, _ in attempts:
        statuses.update(json.loads(raw))
    dead = session.execute(
        select(func.count()).where(d.source == "flush", d.last_seen >= since)
    ).scalar_one()
    outcomes = Counter(o for _, o in attempts)
    return {
        "batch_calls": sum(n for o, n in outcomes.items() if o in ("ok", "partial")),
        "unavailable_calls": outcomes["unavailable"],
        "items_ok": sum(n for s, n in statuses.items() if s.startswith("2")),
        "items_failed": sum(n for s, n in statuses.items() if not s.startswith("2")),
        "dead_letters": int(dead),
    }


@dataclass
class Waited:
    """How a ``flush --wait`` ended: its exit code (0 all flushed, 1 some items ended as dead
    letters, 3 still pending at the timeout) and the run's figures (None: not waited for)."""

    code: int
    figures: dict[str, int] | None = None


def wait_for_flush(wait: bool, timeout: float, poll: float) -> Waited:
    """Trigger a flush; with ``wait``, trigger again every few seconds until nothing is left to
    flush or ``timeout`` seconds have passed, and count what the flushes did meanwhile."""
    started = utcnow()
    app.send_task("accumsync.flush_due")
    if not wait:
        return Waited(0)
    deadline = last_trigger = time.monotonic()
    deadline += timeout
    left = -1
    while time.monotonic() < deadline:
        time.sleep(poll)
        with session_scope() as s:
            left = pending(s)
        if left == 0:
            break
        if time.monotonic() - last_trigger >= RETRIGGER_EVERY:
            app.send_task("accumsync.flush_due")
            last_trigger = time.monotonic()
    with session_scope() as s:
        figures = summary(s, started)
    figures["pending"] = left
    code = 1 if figures["dead_letters"] else 3 if left else 0
    return Waited(code, figures)
