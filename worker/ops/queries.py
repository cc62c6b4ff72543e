"""The questions every operator tool asks the store, each asked one way: what ingest did, what
waits for a flush, which dead letters are open, what is held for a person."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import func, or_, select
from sqlmodel import Session, col

from models.ledger import Kind
from models.tables import Accumulator, DeadLetter
from worker import counters

SOURCES = ("ingest", "flush", "plans", "broker")


def outcomes(session: Session) -> dict[str, int]:
    """Every ingest outcome's count since the store began, by :class:`models.ledger.Kind` (the
    counters: the audit rows are pruned)."""
    counted = counters.read(session, "events.")
    return {kind.value: counted.get(f"events.{kind.value}", 0) for kind in Kind}


def waiting_for_flush(session: Session) -> tuple[int, datetime | None]:
    """Accumulators waiting for a flush (changed, or a write of unknown outcome; not held by a
    dead letter), and the oldest change among them."""
    a = Accumulator
    pending = or_(col(a.dirty_since).is_not(None), col(a.intent_target).is_not(None))
    query = select(func.count(), func.min(a.dirty_since)).where(pending, col(a.held).is_(False))
    count, oldest = session.execute(query).one()
    return int(count), oldest


def open_dead_letters(session: Session) -> dict[str, int]:
    """Open dead letters by source (every source present, at 0 when none)."""
    d = DeadLetter
    source = col(d.source)
    query = select(source, func.count()).where(col(d.replayed_at).is_(None)).group_by(source)
    found = {str(s): int(n) for s, n in session.execute(query)}
    return dict.fromkeys(SOURCES, 0) | found


def held(session: Session) -> dict[str, int]:
    """Accumulators held by an open flush dead letter, by its kind (``ambiguous``, ...)."""
    d = DeadLetter
    kind = func.coalesce(col(d.kind), "refused")
    query = select(kind, func.count()).where(col(d.source) == "flush", col(d.replayed_at).is_(None))
    return {str(k): int(n) for k, n in session.execute(query.group_by(kind))}
