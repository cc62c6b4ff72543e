"""Read-only views of the store for people: status counters and the dead-letter list."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import func, select
from sqlmodel import Session

from models.ledger import Kind
from models.tables import Accumulator, DeadLetter, Pair
from worker.db import age_seconds, utcnow
from worker.ops.queries import open_dead_letters, outcomes, waiting_for_flush, waiting_for_fold
from worker.store.tables import T_DEAD

STATUS_KEYS = (
    *(kind.value for kind in Kind),
    "dead_letters",
    "accumulators",
    "waiting_for_fold",
    "waiting_for_flush",
    "oldest_waiting_age_s",
    "pairs",
)


def status(session: Session, now: datetime | None = None) -> dict[str, Any]:
    """The counters an operator checks first; every key in :data:`STATUS_KEYS`."""
    now = now or utcnow()
    waiting, oldest = waiting_for_flush(session)
    accumulators = session.execute(select(func.count()).select_from(Accumulator)).scalar_one()
    pairs = session.execute(select(func.count()).select_from(Pair)).scalar_one()
    return outcomes(session) | {
        "dead_letters": sum(open_dead_letters(session).values()),
        "accumulators": int(accumulators),
        "waiting_for_fold": waiting_for_fold(session),
        "waiting_for_flush": waiting,
        "oldest_waiting_age_s": age_seconds(oldest, now) or 0.0,
        "pairs": int(pairs),
    }


def dead_letters(
    session: Session, limit: int = 50, source: str | None = None, payload: bool = False
) -> list[dict[str, Any]]:
    """The most recent open dead letters; the raw payload (member data) only when asked."""
    d = T_DEAD.c
    query = select(T_DEAD).where(d.replayed_at.is_(None))
    if source:
        query = query.where(d.source == source)
    query = query.order_by(d.last_seen.desc()).limit(limit)
    rows = []
    for letter in session.execute(query).mappings():
        row = DeadLetter.model_validate(dict(letter))
        shown = row.model_dump(exclude={"fingerprint", "payload"}, mode="json")
        if payload:
            shown["payload"] = letter["payload"]
        rows.append(shown)
    return rows
