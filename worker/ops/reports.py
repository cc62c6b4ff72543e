"""Read-only views of the store for people: status counters and the dead-letter list."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import func, select
from sqlmodel import Session, col

from models.tables import Accumulator, DeadLetter, IngestBatch, Pair
from worker.db import age_seconds, utcnow

STATUS_KEYS = (
    "events_received",
    "events_applied",
    "duplicates",
    "stale",
    "conflicts",
    "invalid",
    "dead_letters",
    "accumulators",
    "dirty_accumulators",
    "oldest_dirty_age_s",
    "pairs",
)


def status(session: Session, now: datetime | None = None) -> dict[str, Any]:
    """The counters an operator checks first; every key in :data:`STATUS_KEYS`."""
    now = now or utcnow()
    b = IngestBatch
    sums = session.execute(
        select(
            func.coalesce(func.sum(b.events), 0),
            func.coalesce(func.sum(b.applied), 0),
            func.coalesce(func.sum(b.duplicates), 0),
            func.coalesce(func.sum(b.stale), 0),
            func.coalesce(func.sum(b.conflicts), 0),
            func.coalesce(func.sum(b.invalid), 0),
        )
    ).one()
    a = Accumulator
    dirty = a.dirty_since.is_not(None)  # type: ignore[union-attr]
    accums, n_dirty, oldest = session.execute(
        select(func.count(), func.count().filter(dirty), func.min(a.dirty_since))
    ).one()
    open_dead = DeadLetter.replayed_at.is_(None)  # type: ignore[union-attr]
    dead = session.execute(
        select(func.count()).select_from(DeadLetter).where(open_dead)
    ).scalar_one()
    pairs = session.execute(select(func.count()).select_from(Pair)).scalar_one()
    oldest_age = age_seconds(oldest, now) or 0.0
    values = [*map(int, sums), int(dead), int(accums), int(n_dirty), oldest_age, int(pairs)]
    return dict(zip(STATUS_KEYS, values, strict=True))


def dead_letters(
    session: Session, limit: int = 50, source: str | None = None, payload: bool = False
) -> list[dict[str, Any]]:
    """The most recent open dead letters; the raw payload (member data) only when asked."""
    query = select(DeadLetter).where(DeadLetter.replayed_at.is_(None))  # type: ignore[union-attr]
    if source:
        query = query.where(col(DeadLetter.source) == source)
    query = query.order_by(DeadLetter.last_seen.desc()).limit(limit)  # type: ignore[attr-defined]
    rows = []
    for d in session.execute(query).scalars():
        row = d.model_dump(exclude={"fingerprint", "payload"}, mode="json")
        if payload:
            row["payload"] = d.payload
        rows.append(row)
    return rows
