"""``accumsync.ingest``: one message = a list of raw ClaimEvent dicts, applied in one transaction.

Enqueued by ``worker.producer.publish``. The message is acknowledged only after the commit
(``acks_late``); a lost database connection re-queues the same message with a short countdown,
so no event is dropped. Results are counts only: Flower shows them, so no member data.
"""

from __future__ import annotations

from typing import Any

from celery import Task
from sqlalchemy.exc import DBAPIError
from sqlmodel import Session

from worker import failpoints
from worker.app import app
from worker.db import in_transaction
from worker.logs import Log
from worker.producer import argsrepr
from worker.store import BatchResult
from worker.store import ingest as ingest_batch

log = Log("ingest")


@app.task(name="accumsync.ingest", bind=True, acks_late=True, max_retries=None)
def ingest(self: Task[Any, Any], events: list[Any]) -> dict[str, int]:
    """Validate, dedupe and apply ``events``; invalid ones become dead letters."""
    # A producer that sends one object (or anything else) instead of a list gets it applied or
    # dead-lettered as one item, not iterated key by key (or character by character).
    batch = events if isinstance(events, list) else [events]
    try:
        result = in_transaction(lambda session: applied(session, batch))
    except DBAPIError as exc:
        delay = min(60, 2 ** min(self.request.retries, 6))
        log.warning("ingest.db_unavailable", retry_in_s=delay, error=type(exc.orig).__name__)
        # The re-sent message keeps the opaque argsrepr (celery-types omits retry's **options).
        raise self.retry(exc=exc, countdown=delay, argsrepr=argsrepr(batch)) from None  # type: ignore[call-arg]
    failpoints.hit("ingest.after_commit")
    log.info("ingest.batch", **result.summary())
    return result.summary()


def applied(session: Session, events: list[Any]) -> BatchResult:
    """The batch applied in ``session`` (committed by the caller)."""
    result = ingest_batch(session, events)
    failpoints.hit("ingest.before_commit")
    return result
