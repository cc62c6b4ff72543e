"""``accumsync.ingest``: one message = a list of raw ClaimEvent dicts, applied in one transaction.

Enqueued by ``worker.producer.publish``. The message is acknowledged only after the commit
(``acks_late``); a lost database connection re-queues the same message with a short countdown,
so no event is dropped. Results are counts only: Flower shows them, so no member data.
"""

from __future__ import annotations

from typing import Any

from celery import Task
from sqlalchemy.exc import DBAPIError

from worker.app import app
from worker.db import in_transaction
from worker.logs import Log
from worker.producer import argsrepr
from worker.store import ingest as ingest_batch

log = Log("ingest")


@app.task(name="accumsync.ingest", bind=True, acks_late=True, max_retries=None)
def ingest(self: Task[Any, Any], events: list[Any]) -> dict[str, int]:
    """Validate, dedupe and apply ``events``; invalid ones become dead letters."""
    try:
        result = in_transaction(lambda session: ingest_batch(session, events))
    except DBAPIError as exc:
        delay = min(60, 2 ** min(self.request.retries, 6))
        log.warning("ingest.db_unavailable", retry_in_s=delay, error=type(exc.orig).__name__)
        # The re-sent message keeps the opaque argsrepr (celery-types omits retry's **options).
        raise self.retry(exc=exc, countdown=delay, argsrepr=argsrepr(events)) from None  # type: ignore[call-arg]
    log.info("ingest.batch", **result.summary())
    return result.summary()
