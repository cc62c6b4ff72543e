"""Durable counts of events of note (token refreshes, logins, 429s), readable by any process.

A worker's in-memory counters die with it and are invisible to ``accumsync metrics``; these live
in the store's ``event_counter`` table. They are fed by observing the structured log events the
VBA client already emits (worker/logs.py ``observe``), so the client needs no metrics code.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlmodel import Session

from models.tables import EventCounter
from worker import logs

T_COUNTER = EventCounter.__table__  # type: ignore[attr-defined]

#: log event -> counter name, counted on every occurrence.
COUNTED = {
    "vba.token_refreshed": "vba_token_refreshes",
    "vba.logged_in": "vba_logins",
}
#: log events whose ``status`` field is counted as ``vba_<status>`` when it is one of these.
STATUS_EVENTS = ("vba.call_failed", "vba.auth_unavailable", "vba.auth_refused")
STATUSES_COUNTED = frozenset({401, 403, 429})

NAMES = ("vba_token_refreshes", "vba_logins", "vba_429", "vba_401", "vba_403")


def bump(name: str, n: int = 1) -> None:
    """Add ``n`` to counter ``name`` in its own short transaction (never fails the caller)."""
    from worker.bulk import insert
    from worker.db import session_scope, utcnow

    with session_scope() as s:
        stmt = insert(s, T_COUNTER).values(name=name, value=n, updated_at=utcnow())
        new = {"value": T_COUNTER.c.value + stmt.excluded.value, "updated_at": utcnow()}
        s.execute(stmt.on_conflict_do_update(index_elements=["name"], set_=new))


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


def _count(event: str, fields: dict[str, Any]) -> None:
    bump(COUNTED[event])


def _count_status(event: str, fields: dict[str, Any]) -> None:
    status = fields.get("status")
    if status in STATUSES_COUNTED:
        bump(f"vba_{status}")


def install() -> None:
    """Count the events of note in this process (idempotent; called by ``worker.app``)."""
    for event in COUNTED:
        logs.observe(event, _count)
    for event in STATUS_EVENTS:
        logs.observe(event, _count_status)
