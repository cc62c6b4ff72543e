"""Which pairs are due, and their fan-out: ``accumsync.flush_due`` (beat, and ``accumsync flush``)
queues one ``accumsync.flush_pair`` per pair with work whose time has come, and
``accumsync.push_plans`` when a plan push waits. Messages carry opaque pair ids only.
"""

from __future__ import annotations

from celery import Celery
from redis.exceptions import RedisError
from sqlalchemy import func, or_, select, update
from sqlmodel import Session

from worker.db import db_after, db_now, in_transaction
from worker.flush.plans import due_count as plans_due
from worker.logs import Log
from worker.settings import get_settings
from worker.store.fold import fold_committed
from worker.store.tables import T_ACCUM, T_PAIR, awaits_flush
from worker.vba.fleet import client

log = Log("flush")


def fan_out(app: Celery) -> int:
    """Queue one flush_pair per due pair (oldest dirty first), none while VBA is paused; the
    number of pairs queued. While a dispatcher leads (worker/flush/dispatch.py) only the pairs
    overdue (``overdue_after``): the sweep is its safety net."""
    fold_committed()  # what is recorded is in the totals before the due pairs are picked
    paused = vba_paused()
    if paused > 0:  # VBA is known down: the first beat after the pause queues the pairs
        log.info("flush.paused", retry_in_s=round(paused, 1))
        return 0
    interval = get_settings().flush_interval

    def pick(session: Session) -> tuple[list[int], bool]:
        from worker.flush.dispatch import leader, overdue_after

        led = leader(session) is not None
        ids = due_pairs(session, overdue=overdue_after(interval) if led else None)
        mark_queued(session, ids, queued_for(interval))
        return ids, led

    pair_ids, led = in_transaction(pick)
    if in_transaction(plans_due):
        app.send_task("accumsync.push_plans")
    send_flushes(app, pair_ids)
    log.info("flush.due", pairs=len(pair_ids), dispatcher=led)
    return len(pair_ids)


def send_flushes(app: Celery, pair_ids: list[int]) -> None:
    """One ``accumsync.flush_pair`` per pair (an opaque id: no member data in the message)."""
    with app.producer_or_acquire() as producer:
        for pair_id in pair_ids:
            app.send_task(
                "accumsync.flush_pair",
                args=[pair_id],
                argsrepr=f"(pair {pair_id})",
                producer=producer,
            )


def queued_for(interval: float) -> float:
    """Seconds a queued pair is not queued again: a lost task is re-queued after this."""
    return max(2 * interval, 5.0)


def vba_paused() -> float:
    """Seconds VBA calls stay paused fleet-wide (the breaker); 0 when they may go."""
    if not get_settings().vba_base_url:
        return 0.0
    try:
        return client().paused()
    except RedisError:  # the breaker's Redis is away: let the flush find out for itself
        return 0.0


def due_pairs(
    session: Session,
    limit: int = 10_000,
    rested: float = 0.0,
    overdue: float | None = None,
) -> list[int]:
    """Pairs with dirty keys or unknown outcomes whose retry time has come, oldest first
    (every time compared by the database's clock); ``rested``: none flushed in the last so many
    seconds; ``overdue``: only those whose oldest change has waited so many seconds."""
    a, p, now = T_ACCUM.c, T_PAIR.c, db_now()
    query = (
        select(p.id)
        .join(T_ACCUM, a.pair_id == p.id)
        .where(awaits_flush())
        .where(or_(a.next_attempt_at.is_(None), a.next_attempt_at <= now))
        .where(or_(p.next_attempt_at.is_(None), p.next_attempt_at <= now))
        .where(or_(p.queued_until.is_(None), p.queued_until < now))
        .where(or_(p.lease_until.is_(None), p.lease_until < now))
        .group_by(p.id)
        .order_by(func.min(a.dirty_since))
        .limit(limit)
    )
    if rested > 0:
        query = query.where(or_(p.last_flush_at.is_(None), p.last_flush_at <= db_after(-rested)))
    if overdue is not None:
        query = query.having(func.min(a.dirty_since) <= db_after(-overdue))
    return [int(r[0]) for r in session.execute(query)]


def mark_queued(session: Session, pair_ids: list[int], seconds: float) -> None:
    """Note that a flush task is queued for these pairs, so beat does not queue them twice."""
    for start in range(0, len(pair_ids), 900):
        part = pair_ids[start : start + 900]
        stmt = update(T_PAIR).where(T_PAIR.c.id.in_(part))
        session.execute(stmt.values(queued_until=db_after(seconds)))
