"""The dispatcher: a change starts its flush within a round, not at beat's next tick.

Beat's ``flush_due`` alone makes a change wait for the next tick: half the interval on average,
a whole one at worst, while VBA's budget sits idle between ticks. ``accumsync dispatch`` runs a
loop instead. One dispatcher leads at a time, elected through the store (the ``dispatcher`` row
of ``shared_state``, a lease of :data:`LEASE_S` seconds by the store's clock, renewed every
round); another started beside it, by design or by mistake, only waits, and takes over once the
leader's lease lapses. Each round (``ACCUMSYNC_DISPATCH_ROUND`` seconds) the leader admits the
pairs whose oldest change has waited longest, as many as there are free flush slots
(``ACCUMSYNC_DISPATCH_SLOTS`` less the pairs already queued or leased), none within
``ACCUMSYNC_DISPATCH_SPACING`` seconds of its last flush, marks them queued and sends one
``accumsync.flush_pair`` each. A flush is fenced by its pair's lease whoever queued it, so two
dispatchers, or a dispatcher and beat, never put two writes for one pair in flight.

Beat's sweep stays as the safety net: while no dispatcher leads it fans out every due pair, as
before; while one leads, only the pairs overdue by :func:`overdue_after` (a lost task, a
dispatcher stalled but still renewing).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import time
from types import FrameType
from typing import Any
from uuid import uuid4

from celery import Celery
from sqlalchemy import func, or_, select, update
from sqlmodel import Session

from worker.db import db_after, db_now, in_transaction, insert
from worker.flush.due import due_pairs, mark_queued, queued_for, send_flushes, vba_paused
from worker.logs import Log
from worker.settings import Settings, get_settings
from worker.store.fold import fold_committed
from worker.store.tables import T_PAIR, T_SHARED

log = Log("dispatch")

LEADER = "dispatcher"
#: Seconds a leader's lease lasts without renewal: how long a dead dispatcher's pairs wait.
LEASE_S = 3.0
#: Seconds between two renewals of the lease (a write to the store; the rounds between only
#: read).
RENEW_S = 1.0
#: While a dispatcher leads, beat queues only pairs that have waited this many intervals, and a
#: minute at least (a backlog at VBA's budget is not overdue).
OVERDUE_TICKS = 3
OVERDUE_MIN_S = 60.0


def overdue_after(interval: float) -> float:
    """Seconds a pair waits, while a dispatcher leads, before beat's sweep queues it too."""
    return max(OVERDUE_TICKS * interval, OVERDUE_MIN_S)


def take_lead(session: Session, me: str, seconds: float = LEASE_S) -> bool:
    """Lead (or go on leading) if the lease is free, lapsed or ours; renew it for ``seconds``."""
    c = T_SHARED.c
    mine_or_free = or_(c.until.is_(None), c.until < db_now(), c.value == me)
    renew = update(T_SHARED).where(c.name == LEADER, mine_or_free)
    if session.execute(renew.values(value=me, until=db_after(seconds))).rowcount:  # type: ignore[attr-defined]
        return True
    first = insert(session, T_SHARED).values(name=LEADER, value=me, until=db_after(seconds))
    # RETURNING, not rowcount: psycopg reports -1 for an INSERT .. ON CONFLICT DO NOTHING.
    return session.execute(first.on_conflict_do_nothing().returning(c.name)).first() is not None


def leader(session: Session) -> dict[str, Any] | None:
    """The leading dispatcher (``host``, ``pid``), or None when none leads."""
    c = T_SHARED.c
    query = select(c.value).where(c.name == LEADER, c.until >= db_now())
    value = session.execute(query).scalar_one_or_none()
    return None if value is None else dict(json.loads(value))


def in_flight(session: Session) -> int:
    """Pairs with a flush queued or running (by the store's clock)."""
    p, now = T_PAIR.c, db_now()
    busy = or_(p.queued_until >= now, p.lease_until >= now)
    return int(session.execute(select(func.count()).select_from(T_PAIR).where(busy)).scalar_one())


def admit(session: Session, settings: Settings) -> list[int]:
    """The pairs to flush now, oldest change first, marked queued."""
    free = settings.dispatch_slots - in_flight(session)
    if free <= 0:
        return []
    ids = due_pairs(session, limit=free, rested=settings.dispatch_spacing)
    mark_queued(session, ids, queued_for(settings.flush_interval))
    return ids


class Dispatcher:
    """The loop of ``accumsync dispatch`` (see the module)."""

    def __init__(self, app: Celery, settings: Settings | None = None) -> None:
        self.app, self.settings = app, settings or get_settings()
        ident = {"host": socket.gethostname(), "pid": os.getpid(), "id": uuid4().hex[:8]}
        self.me = json.dumps(ident, sort_keys=True)
        self.leading = False
        self.stopping = False
        self.admitted = 0
        self.renewed = 0.0

    def run(self, rounds: int | None = None) -> None:
        """Lead or wait, round after round, until stopped (SIGTERM, SIGINT) or ``rounds`` run."""
        done = 0
        while not self.stopping and (rounds is None or done < rounds):
            started, pause = time.monotonic(), self.settings.dispatch_round
            try:
                self.round()
            except Exception as exc:  # the store or broker away: say so, try again shortly
                log.warning("dispatch.round_failed", error=type(exc).__name__, retry_in_s=1.0)
                self.leading, pause = False, 1.0
            done += 1
            time.sleep(max(0.0, pause - (time.monotonic() - started)))
        if self.leading:
            in_transaction(self._resign)

    def round(self) -> None:
        now = time.monotonic()
        if now - self.renewed < RENEW_S and self.leading:
            leading = True  # renewed under a second ago: the lease has two seconds left at least
        else:
            leading = in_transaction(lambda s: take_lead(s, self.me))
            self.renewed = now
        if leading != self.leading:
            self.leading = leading
            log.info("dispatch.leading" if leading else "dispatch.waiting", me=self.me)
        if not leading:
            return
        fold_committed()  # a change recorded this round is admitted this round
        if vba_paused() > 0:
            return
        ids = in_transaction(lambda s: admit(s, self.settings))
        if ids:
            send_flushes(self.app, ids)
            self.admitted += len(ids)
            log.debug("dispatch.admitted", pairs=len(ids))

    def _resign(self, session: Session) -> None:
        """A dispatcher stopping hands the lead over at once (its lease is ended)."""
        c = T_SHARED.c
        mine = update(T_SHARED).where(c.name == LEADER, c.value == self.me)
        session.execute(mine.values(until=db_after(-1)))
        log.info("dispatch.stopped", me=self.me, admitted=self.admitted)

    def stop(self, signum: int = 0, frame: FrameType | None = None) -> None:
        self.stopping = True


def serve(app: Celery) -> None:
    """``accumsync dispatch``: run a dispatcher until SIGTERM or SIGINT."""
    dispatcher = Dispatcher(app)
    signal.signal(signal.SIGTERM, dispatcher.stop)
    signal.signal(signal.SIGINT, dispatcher.stop)
    log.info("dispatch.started", me=dispatcher.me, round_s=dispatcher.settings.dispatch_round)
    dispatcher.run()
