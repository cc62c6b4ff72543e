"""``accumsync.ingest``: one message = a list of raw ClaimEvent dicts, applied in one transaction.

Enqueued by ``worker.producer.publish``. The message is acknowledged only after the commit
(``acks_late``); a lost database connection re-queues the same message with a short countdown,
so no event is dropped. Results are counts only: Flower shows them, so no member data.
"""

from __future__ import annotations

from typing import Any

from celery import Task
from sqlalchemy.exc import DataError, DBAPIError, StatementError
from sqlmodel import Session

from worker import failpoints
from worker.app import app
from worker.db import in_transaction
from worker.logs import Log
from worker.producer import argsrepr
from worker.store import BatchResult, refuse, storable
from worker.store import ingest as ingest_batch

log = Log("ingest")


@app.task(name="accumsync.ingest", bind=True, acks_late=True, max_retries=None)
def ingest(self: Task[Any, Any], events: list[Any]) -> dict[str, int]:
    """Validate, dedupe and apply ``events``; invalid ones become dead letters."""
    # A producer that sends one object (or anything else) instead of a list gets it applied or
    # dead-lettered as one item, not iterated key by key (or character by character).
    batch = events if isinstance(events, list) else [events]
    try:
        result = isolating(batch)
    except DBAPIError as exc:
        delay = min(60, 2 ** min(self.request.retries, 6))
        log.warning("ingest.db_unavailable", retry_in_s=delay, error=type(exc.orig).__name__)
        # The re-sent message keeps the opaque argsrepr (celery-types omits retry's **options).
        raise self.retry(exc=exc, countdown=delay, argsrepr=argsrepr(batch)) from None  # type: ignore[call-arg]
    failpoints.hit("ingest.after_commit")
    log.info("ingest.batch", **result.summary())
    return result.summary()


def isolating(batch: list[Any]) -> BatchResult:
    """Apply ``batch`` in one transaction; if the store refuses an event's data, find it.

    Validation should leave the store nothing to refuse, but if a value still gets past it (a
    new rule of Postgres, a producer bug no rule foresaw), bisect: each half in its own
    transaction, down to the single events the store refuses, which become dead letters with
    its reason. The rest of the batch lands; nothing loops forever as "database unavailable".
    """
    try:
        return in_transaction(lambda session: applied(session, batch))
    except (StatementError, UnicodeError) as exc:
        if not refused_by_store(exc):
            raise
        if len(batch) > 1:
            log.warning("ingest.store_refused_batch", events=len(batch), error=error_name(exc))
            half = len(batch) // 2
            return isolating(batch[:half]).merged(isolating(batch[half:]))
        reason = f"event: the store refused it ({error_name(exc)}: {first_line(exc)})"
        return in_transaction(lambda session: refuse(session, batch[0], reason))


def refused_by_store(exc: StatementError | UnicodeError) -> bool:
    """The data was refused (a bad value), as opposed to the database being unreachable."""
    return isinstance(exc, DataError | UnicodeError) or not isinstance(exc, DBAPIError)


def error_name(exc: StatementError | UnicodeError) -> str:
    return type(exc.orig if isinstance(exc, StatementError) else exc).__name__


def first_line(exc: StatementError | UnicodeError) -> str:
    """The error's own first line: never the statement, its parameters or the JSON context.

    A UnicodeError's message quotes the offending text, so only its reason is kept."""
    if isinstance(exc, UnicodeError):
        return str(getattr(exc, "reason", "not encodable as UTF-8"))
    return storable((str(exc.orig).strip().splitlines() or ["no message"])[0][:200])


def applied(session: Session, events: list[Any]) -> BatchResult:
    """The batch applied in ``session`` (committed by the caller)."""
    result = ingest_batch(session, events)
    failpoints.hit("ingest.before_commit")
    return result
