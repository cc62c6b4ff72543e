"""``accumsync.ingest``: one message = a list of raw ClaimEvent dicts (or its JSON text), recorded
in one transaction, then folded into the totals with whatever else is committed
(docs/design.md, "Record, then fold").

Enqueued by ``worker.ingest.producer.publish``. The message is acknowledged only after the commit
(``acks_late``); a lost database connection, or a batch past its soft time limit, re-queues the
same message with a short countdown, so no event is dropped. Results are counts only: Flower
shows them, so no member data. The work lives in worker/ingest/.
"""

from __future__ import annotations

from typing import Any

from celery import Task
from celery.exceptions import SoftTimeLimitExceeded
from sqlalchemy.exc import DBAPIError

from worker import failpoints
from worker.celery import app
from worker.ingest import wire
from worker.ingest.poison import isolating
from worker.ingest.producer import argsrepr
from worker.ingest.store import IngestCounts
from worker.ingest.undeliverable import undeliverable
from worker.logs import Log
from worker.settings import get_settings
from worker.store.fold import PROCESS_FOLD

log = Log("ingest")


def retry_delay(retries: int) -> float:
    """Seconds before a batch whose database was away runs again: 1, 2, 4... up to 60, and never
    more than half the broker's visibility timeout. Redis hands a message that waits out a longer
    countdown to another worker meanwhile, and every copy retries on its own: during an outage
    they multiply (a 30 s Postgres stop at a visibility of 8 s: 97 runs of 62 messages)."""
    return min(60.0, 2.0 ** min(retries, 6), get_settings().broker_visibility_timeout / 2)


# A batch of 2,000 takes tenths of a second; the limits only catch a stuck one (a lock held by a
# dead session, say), which is retried: its transaction rolled back, nothing of it landed.
@app.task(
    name="accumsync.ingest",
    bind=True,
    acks_late=True,
    max_retries=None,
    soft_time_limit=300,
    time_limit=330,
    Request="worker.ingest.handoff:IngestRequest",
)
def ingest(self: Task[Any, Any], *args: Any, **kwargs: Any) -> dict[str, int]:
    """Validate, dedupe and apply the events of ``args[0]``; invalid ones become dead letters."""
    # args[0] is the JSON text of the list (``publish``'s form) or the list itself (another
    # language's producer). One object, or anything else, is applied or dead-lettered as one
    # item, not iterated key by key (or character by character).
    batch = wire.batch(args[0] if len(args) == 1 and not kwargs else None)
    try:
        if len(args) != 1 or kwargs:  # a foreign producer's message of the wrong shape
            why = (
                f"accumsync.ingest takes one argument, a list of events; this message had "
                f"{len(args)} and keywords {sorted(kwargs)}"
            )
            undeliverable({"args": args, "kwargs": kwargs}, "bad_arguments", why, self.name)
            return {"received": 0, "bad_arguments": 1}
        result = isolating(batch)
    except (DBAPIError, SoftTimeLimitExceeded) as exc:
        delay = retry_delay(self.request.retries)
        error = type(getattr(exc, "orig", exc)).__name__
        log.warning("ingest.db_unavailable", retry_in_s=delay, error=error)
        # The re-sent message keeps the opaque argsrepr (celery-types omits retry's **options).
        raise self.retry(exc=exc, countdown=delay, argsrepr=argsrepr(batch)) from None  # type: ignore[call-arg]
    failpoints.hit("ingest.after_commit")
    log.info("ingest.batch", **result.summary(), recorded=result.recorded)
    fold_after(result)
    return result.summary() | {"recorded": result.recorded}


def fold_after(result: IngestCounts) -> None:
    """Have what this batch recorded folded soon, with whatever else is committed by then
    (worker/store/fold.py, :class:`Soon`). The batch is committed whatever happens to the fold:
    a fold that fails leaves it to the next one (the dispatcher's round, beat's sweep, the next
    batch's), so the message is not retried for it."""
    if result.recorded:
        PROCESS_FOLD.ask()
