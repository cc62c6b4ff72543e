"""Durable counters, readable by any process at a cost that does not grow with history:
``accumsync metrics``, ``status`` and ``health`` read them from the store's ``event_counter``
table, never by summing the audit tables (which are pruned: ``worker.ops.retention``).

- events of note (logins, token refreshes, 401s, 403s, 429s), bumped by the VBA client through
  an explicit hook (``VbaClient(on_event=counters.bump)``, wired by ``worker.flush.protocol``) in
  a short transaction of their own: a log call never writes to the database;
- ingest outcomes (``events.applied``, ...), batch calls (``calls.<outcome>.<http status>``) and
  207 item statuses (``items.<status>``), added by :func:`add` in the transaction that records
  them, so a count and what it counts commit together.

Each name is kept as a few rows, ``name@shard`` with the writing process's shard: concurrent
batches in different processes add to different rows and never wait on one hot row. A counter's
``updated_at`` is when it last moved (``last``: the last successful batch call, the last
progress), so no scrape reads the audit tables either.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from datetime import datetime

from sqlalchemy import func, or_, select
from sqlmodel import Session

from worker.db import insert, session_scope, utcnow
from worker.logs import Log
from worker.store.tables import T_COUNTER

NAMES = ("vba_token_refreshes", "vba_logins", "vba_429", "vba_401", "vba_403")
SHARDS = 8
"""Rows per counter: enough that two worker processes rarely share one."""
log = Log("counters")


def shard_of(name: str) -> str:
    """The row this process adds ``name`` to."""
    return f"{name}@{os.getpid() % SHARDS}"


def bump(name: str, n: int = 1) -> None:
    """Add ``n`` to counter ``name`` in its own short transaction; never fails the caller (a
    count is not worth a VBA call's outcome)."""
    try:
        with session_scope() as s:
            add(s, {name: n})
    except Exception as exc:
        log.warning("counters.not_counted", counter=name, error=type(exc).__name__)


def add(session: Session, counts: Mapping[str, int]) -> None:
    """Add each count to its counter in the caller's transaction (rows in name order, so two
    transactions adding to the same counters never deadlock on them)."""
    now = utcnow()
    rows = [
        {"name": shard_of(name), "value": n, "updated_at": now}
        for name, n in sorted(counts.items())
        if n
    ]
    if not rows:
        return
    stmt = insert(session, T_COUNTER).values(rows)
    moved = {"value": T_COUNTER.c.value + stmt.excluded.value, "updated_at": now}
    session.execute(stmt.on_conflict_do_update(index_elements=["name"], set_=moved))


def read(session: Session, prefix: str = "") -> dict[str, int]:
    """Every counter (optionally those starting with ``prefix``), summed over its shards; the
    events of note never bumped read 0."""
    values = dict.fromkeys(NAMES, 0) if not prefix else {}
    query = select(T_COUNTER.c.name, T_COUNTER.c.value)
    if prefix:
        query = query.where(T_COUNTER.c.name.startswith(prefix, autoescape=True))
    for raw, value in session.execute(query):
        name = str(raw).rsplit("@", 1)[0]
        values[name] = values.get(name, 0) + int(value)
    return values


def last(session: Session, *names: str, prefix: tuple[str, ...] = ()) -> datetime | None:
    """When any of ``names`` (or any counter starting with one of ``prefix``) last moved; None
    when none ever did."""
    c = T_COUNTER.c
    wanted = [or_(c.name == n, c.name.startswith(f"{n}@", autoescape=True)) for n in names]
    wanted += [c.name.startswith(p, autoescape=True) for p in prefix]
    if not wanted:
        return None
    query = select(func.max(c.updated_at)).where(or_(*wanted))
    found: datetime | None = session.execute(query).scalar()
    return found
