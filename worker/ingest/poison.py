"""Poison the store refuses: a batch whose statement the database refuses (a value validation
let through) is bisected down to the events it refuses, which become dead letters with its
reason; the rest of the batch lands. Nothing loops for ever as "database unavailable"."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy.exc import DataError, DBAPIError, StatementError
from sqlmodel import Session

from worker import failpoints
from worker.db import in_transaction
from worker.ingest.store import IngestCounts, refuse
from worker.ingest.store import ingest as ingest_batch
from worker.logs import Log
from worker.store.dead_letters import storable

log = Log("ingest")


def isolating(batch: Sequence[Any]) -> IngestCounts:
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


def applied(session: Session, events: Sequence[Any]) -> IngestCounts:
    """The batch applied in ``session`` (committed by the caller)."""
    result = ingest_batch(session, events)
    failpoints.hit("ingest.before_commit")
    return result
