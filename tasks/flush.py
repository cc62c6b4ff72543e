"""``accumsync.flush_due`` (beat) fans out ``accumsync.flush_pair`` per pair with work to do.

flush_due is enqueued by beat every ACCUMSYNC_FLUSH_INTERVAL seconds (worker/schedule.py) and by
``accumsync flush``. Each flush_pair message carries an opaque pair id only; the protocol itself
lives in worker/flush.py. Results are counts, so Flower shows no member data.
"""

from __future__ import annotations

from sqlmodel import Session

from worker.app import app
from worker.db import in_transaction
from worker.flush import due_pairs, mark_queued, vba_paused
from worker.flush import flush_pair as run_flush
from worker.logs import Log
from worker.plans import due_count as plans_due
from worker.plans import push_due
from worker.settings import get_settings

log = Log("flush")


def queued_for(interval: float) -> float:
    """Seconds a queued pair is not queued again: a lost task is re-queued after this."""
    return max(2 * interval, 5.0)


@app.task(name="accumsync.flush_due")
def flush_due() -> dict[str, int]:
    """Queue one flush_pair task per due pair (oldest dirty first); none while VBA is paused."""
    paused = vba_paused()
    if paused > 0:  # VBA is known down: the first beat after the pause queues the pairs
        log.info("flush.paused", retry_in_s=round(paused, 1))
        return {"pairs": 0}

    def pick(session: Session) -> list[int]:
        ids = due_pairs(session)
        mark_queued(session, ids, queued_for(get_settings().flush_interval))
        return ids

    pair_ids = in_transaction(pick)
    if in_transaction(plans_due):
        app.send_task("accumsync.push_plans")
    with app.producer_or_acquire() as producer:
        for pair_id in pair_ids:
            app.send_task(
                "accumsync.flush_pair",
                args=[pair_id],
                argsrepr=f"(pair {pair_id})",
                producer=producer,
            )
    log.info("flush.due", pairs=len(pair_ids))
    return {"pairs": len(pair_ids)}


@app.task(name="accumsync.flush_pair", acks_late=True)
def flush_pair(pair_id: int) -> dict[str, int | bool]:
    """Flush one (subscriber, group) pair to VBA; see worker/flush.py."""
    return run_flush(pair_id).summary()


@app.task(name="accumsync.push_plans", acks_late=True)
def push_plans() -> dict[str, int]:
    """Send the plan pushes whose retry time has come; see worker/plans.py."""
    report = push_due()
    return {"plans": len(report.rows), "failed": report.failed, "pending": report.pending}
