"""The producer API: publish raw ClaimEvent dicts as batched ``accumsync.ingest`` messages.

Events are not validated here: the worker validates at its edge and dead-letters what fails, so
a producer in any language gets the same treatment. Monitoring (Flower) sees only the batch size
and its first and last event ids (``argsrepr``), never member data.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from itertools import islice
from typing import Any

from worker.celery import app

DEFAULT_BATCH = 500


def argsrepr(batch: list[Any]) -> str:
    """Monitoring's view of a batch: its size and first/last event ids."""
    ids = [str(e.get("event_id"))[:128] for e in batch if isinstance(e, dict)]
    span = f" {ids[0]}..{ids[-1]}" if ids else ""
    return f"({len(batch)} events{span})"


def batches(events: Iterable[Any], size: int) -> Iterable[list[Any]]:
    it = iter(events)
    while batch := list(islice(it, size)):
        yield batch


def connect(retries: int = 1) -> None:
    """Raise kombu's ``OperationalError`` unless the broker takes a connection (a retry or two)."""
    with app.connection_for_write() as conn:
        conn.ensure_connection(max_retries=retries)


def publish(
    events: Iterable[Any],
    batch_size: int = DEFAULT_BATCH,
    on_batch: Callable[[int], None] | None = None,
) -> int:
    """Send ``events`` in messages of ``batch_size``; returns how many were sent."""
    if batch_size < 1:
        raise ValueError("batch_size: must be >= 1")
    sent = 0
    with app.producer_or_acquire() as producer:
        for batch in batches(events, batch_size):
            app.send_task(
                "accumsync.ingest",
                args=[batch],
                argsrepr=argsrepr(batch),
                kwargsrepr="{}",
                producer=producer,
            )
            sent += len(batch)
            if on_batch:
                on_batch(len(batch))
    return sent
