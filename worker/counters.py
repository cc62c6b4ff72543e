"""Durable counts of events of note (logins, token refreshes, 401s, 403s, 429s), readable by any
process: ``accumsync metrics`` and ``health`` read them from the store's ``event_counter`` table.

A worker's in-memory counters die with it and are invisible to another process. The VBA client
reports each event through an explicit hook (``VbaClient(on_event=counters.bump)``, wired by
``worker.flush.protocol.client``); a log call never writes to the database.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import select
from sqlmodel import Session

from models.tables import EventCounter
from worker.db import insert, session_scope, utcnow
from worker.logs import Log

T_COUNTER = EventCounter.__table__  # type: ignore[attr-defined]
NAMES = ("vba_token_refreshes", "vba_logins", "vba_429", "vba_401", "vba_403")
log = Log("counters")


def bump(name: str, n: int = 1) -> None:
    """Add ``n`` to counter ``name`` in its own short transaction; never fails the caller (a
    count is not worth a VBA call's outcome)."""
    try:
        with session_scope() as s:
            stmt = insert(s, T_COUNTER).values(name=name, value=n, updated_at=utcnow())
            new = {"value": T_COUNTER.c.value + stmt.excluded.value, "updated_at": utcnow()}
            s.execute(stmt.on_conflict_do_update(index_elements=["name"], set_=new))
    except Exception as exc:
        log.warning("counters.not_counted", counter=name, error=type(exc).__name__)


def read(session: Session) -> dict[str, int]:
    """Every counter, those never bumped at 0."""
    values = dict.fromkeys(NAMES, 0)
    for name, value in session.execute(select(T_COUNTER.c.name, T_COUNTER.c.value)):
        values[str(name)] = int(value)
    return values


def last(session: Session, name: str) -> datetime | None:
    """When counter ``name`` was last bumped (None: never)."""
    query = select(T_COUNTER.c.updated_at).where(T_COUNTER.c.name == name)
    found: datetime | None = session.execute(query).scalar()
    return found
