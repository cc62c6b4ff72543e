"""The audit tables' retention: ``ingest_batch`` (one row per ingested message) and
``flush_attempt`` (one row per batch call to VBA) grow with every message and call, about two
million rows a day at VBA's 25 calls/s. Their totals live on in the counters
(``worker.store.counters``), so pruning rows older than ``ACCUMSYNC_AUDIT_RETENTION_DAYS``
loses no figure: only the detail of old batches and calls (``accumsync explain`` shows a
key's calls within the retention).

Beat runs :func:`prune` hourly (``accumsync.prune``), ``accumsync prune`` runs it by hand. It
deletes in chunks, each its own short transaction by the database's clock, so it never holds
locks long or competes with ingest and the flush for more than a chunk at a time.
``received_event`` is never pruned: it is the ledger's memory of every event id (a redelivery
years later must still count once) and what producers' receipts are read from.
"""

from __future__ import annotations

from typing import Any, cast

from sqlalchemy import CursorResult, Table, delete, select

from worker.db import db_after, session_scope
from worker.logs import Log
from worker.settings import Settings
from worker.store.tables import T_ATTEMPT, T_BATCH

log = Log("retention")
CHUNK = 10_000
AUDIT: tuple[tuple[Table, str], ...] = (
    (T_BATCH, "at"),
    (T_ATTEMPT, "started_at"),
)


def prune(settings: Settings, chunk: int = CHUNK) -> dict[str, int]:
    """Delete the audit rows older than the retention; rows deleted per table (counts only)."""
    days = settings.audit_retention_days
    if days <= 0:
        return {}
    deleted = {table.name: _prune(table, column, days * 86_400, chunk) for table, column in AUDIT}
    log.info("retention.pruned", days=days, **deleted)
    return deleted


def _prune(table: Table, column: str, seconds: float, chunk: int) -> int:
    """Delete ``table``'s rows whose ``column`` is older than ``seconds``, ``chunk`` at a time.
    A batch not folded yet is kept whatever its age: its versions' fold names it."""
    old = select(table.c.id).where(table.c[column] < db_after(-seconds))
    if table is T_BATCH:
        old = old.where(T_BATCH.c.folded_at.is_not(None))
    old = old.limit(chunk)
    total = 0
    while True:
        with session_scope() as session:
            done = cast(
                CursorResult[Any], session.execute(delete(table).where(table.c.id.in_(old)))
            )
        total += done.rowcount
        if done.rowcount < chunk:
            return total
