"""The questions every operator tool asks the store, each asked one way: what ingest did, what
waits for a flush, which dead letters are open, what is held for a person."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import func, select
from sqlmodel import Session

from models.ledger import Kind
from worker.store import counters
from worker.store.fold import unfolded
from worker.store.tables import T_ACCUM, T_DEAD, awaits_flush

SOURCES = ("ingest", "flush", "plans", "broker")


def outcomes(session: Session) -> dict[str, int]:
    """Every ingest outcome's count since the store began, by :class:`models.ledger.Kind` (the
    counters: the audit rows are pruned)."""
    counted = counters.read(session, "events.")
    return {kind.value: counted.get(f"events.{kind.value}", 0) for kind in Kind}


def waiting_for_flush(session: Session) -> tuple[int, datetime | None]:
    """Accumulators waiting for a flush (changed, or a write of unknown outcome; not held by a
    dead letter), and the oldest change among them."""
    query = select(func.count(), func.min(T_ACCUM.c.dirty_since)).where(awaits_flush())
    count, oldest = session.execute(query).one()
    return int(count), oldest


def waiting_for_fold(session: Session) -> int:
    """Ingest batches committed and not folded into the totals yet (worker/store/fold.py)."""
    return unfolded(session)


def open_dead_letters(session: Session) -> dict[str, int]:
    """Open dead letters by source (every source present, at 0 when none)."""
    d = T_DEAD.c
    query = select(d.source, func.count()).where(d.replayed_at.is_(None)).group_by(d.source)
    found = {str(s): int(n) for s, n in session.execute(query)}
    return dict.fromkeys(SOURCES, 0) | found


def held(session: Session) -> dict[str, int]:
    """Accumulators held by an open flush dead letter, by its kind (``ambiguous``, ...)."""
    d = T_DEAD.c
    kind = func.coalesce(d.kind, "refused")
    query = select(kind, func.count()).where(d.source == "flush", d.replayed_at.is_(None))
    return {str(k): int(n) for k, n in session.execute(query.group_by(kind))}
