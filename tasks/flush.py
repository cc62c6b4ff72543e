"""The flush's Celery entry points, on ``ACCUMSYNC_FLUSH_QUEUE``: ``accumsync.flush_due`` (beat)
fans out ``accumsync.flush_pair`` per due pair and ``accumsync.push_plans``.

flush_due is enqueued by beat every ACCUMSYNC_FLUSH_INTERVAL seconds (worker/schedule.py) and by
``accumsync flush``. Messages carry opaque ids; results are counts, so Flower shows no member
data. The work lives in worker/flush/.
"""

from __future__ import annotations

from sqlalchemy.exc import DBAPIError

from worker.celery import app
from worker.flush.due import fan_out
from worker.flush.plans import push_due
from worker.flush.protocol import flush_pair as run_flush
from worker.logs import Log

log = Log("flush")


def store_away(task: str, exc: DBAPIError) -> dict[str, int]:
    """The store went away mid-task (a Postgres restart, a failover): one warning line, not an
    ERROR with a traceback per pair per beat tick. Nothing is lost by ending here: a pair's state
    is the store's (an intent already sent is settled by the next flush, see the settle rule), and
    beat queues every due pair again once the store is back."""
    log.warning("flush.db_unavailable", task=task, error=type(exc.orig).__name__)
    return {"store_unavailable": 1}


@app.task(name="accumsync.flush_due", soft_time_limit=60, time_limit=90)
def flush_due() -> dict[str, int]:
    """Queue one flush_pair task per due pair (oldest dirty first); none while VBA is paused."""
    try:
        return {"pairs": fan_out(app)}
    except DBAPIError as exc:
        return store_away("flush_due", exc)


# A pair's flush makes a few VBA calls per chunk of 100 keys, each bounded by VBA_TIMEOUT; ten
# minutes is far past any real pair. Past the soft limit the flush records a backoff and stops.
@app.task(name="accumsync.flush_pair", acks_late=True, soft_time_limit=600, time_limit=660)
def flush_pair(pair_id: int) -> dict[str, int | bool]:
    """Flush one (subscriber, group) pair to VBA; see worker/flush/protocol.py."""
    try:
        return run_flush(pair_id).summary()
    except DBAPIError as exc:
        return dict(store_away("flush_pair", exc))


@app.task(name="accumsync.push_plans", acks_late=True, soft_time_limit=600, time_limit=660)
def push_plans() -> dict[str, int]:
    """Send the plan pushes whose retry time has come; see worker/flush/plans.py."""
    try:
        report = push_due()
    except DBAPIError as exc:
        return store_away("push_plans", exc)
    return {"plans": len(report.rows), "failed": report.failed, "pending": report.pending}
