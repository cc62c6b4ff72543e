"""The producer API: publish raw ClaimEvent dicts as batched ``accumsync.ingest`` messages.

Events are not validated here: the worker validates at its edge and dead-letters what fails, so
a producer in any language gets the same treatment. Monitoring (Flower) sees only the batch size
and its first and last event ids (``argsrepr``), never member data.

A broker out of memory (Redis at ``maxmemory`` with ``noeviction``) refuses a message at once;
``publish`` raises :class:`BrokerFull`, saying how many events of the call were queued first.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from itertools import islice
from typing import Any
from urllib.parse import urlsplit

from worker.celery import app
from worker.ingest import wire
from worker.settings import get_settings

COMPRESSION = "zstd"
"""A batch's body travels compressed (kombu's zstd codec: a header names it, and every consumer
decompresses by it). At 2,000 events a message's JSON is about 750 kB; compressed, a tenth. It
costs the producer 0.8 us an event, and saves the worker's main process more: the base64 of
the body, the bytes read from Redis and those written back as the unacknowledged record all
shrink ten times (bench/README.md, finding 21). A backlog waiting in Redis takes a tenth of the
memory. A producer in another language may compress or not (docs/producers.md)."""


class BrokerFull(Exception):
    """The broker refused a message because it is out of memory (Redis ``maxmemory`` reached,
    policy ``noeviction``). ``sent`` events of the call were queued before it, in order; the
    rest were not. Publish them again once memory frees: an event queued twice counts once."""

    def __init__(self, sent: int, broker: str) -> None:
        self.sent, self.broker = sent, broker
        super().__init__(
            f"the broker at {broker} is full (Redis maxmemory reached, policy noeviction) and "
            f"refused the message: {sent} events were queued before it, the rest were not; free "
            "memory (let the workers drain the queue, or raise maxmemory) and publish the rest "
            "again (an event already queued counts once)"
        )


def _out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` (kombu wraps the driver's error) is the broker out of memory refusing."""
    from redis.exceptions import OutOfMemoryError

    seen: BaseException | None = exc
    for _ in range(8):  # a chain is short; a bound, in case one is circular
        if seen is None or isinstance(seen, OutOfMemoryError):
            return seen is not None
        seen = seen.__cause__ or seen.__context__
    return False


def _where() -> str:
    parts = urlsplit(str(app.conf.broker_url))
    return f"{parts.hostname}:{parts.port}" if parts.hostname else parts.scheme


def argsrepr(batch: Sequence[Any]) -> str:
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
    batch_size: int | None = None,
    on_batch: Callable[[int], None] | None = None,
) -> int:
    """Send ``events`` in messages of ``batch_size`` (default: ACCUMSYNC_INGEST_BATCH_SIZE),
    each batch as one JSON text (``worker.ingest.wire``); returns how many were sent.

    Raises :class:`BrokerFull` when the broker is out of memory. Its message is ours: the
    driver's would quote the refused command, and a command can carry the start of a body."""
    if batch_size is None:
        batch_size = get_settings().ingest_batch_size
    if batch_size < 1:
        raise ValueError("batch_size: must be >= 1")
    sent = 0
    try:
        with app.producer_or_acquire() as producer:
            for batch in batches(events, batch_size):
                app.send_task(
                    "accumsync.ingest",
                    args=[wire.encode(batch)],
                    argsrepr=argsrepr(batch),
                    kwargsrepr="{}",
                    compression=COMPRESSION,
                    producer=producer,
                )
                sent += len(batch)
                if on_batch:
                    on_batch(len(batch))
    except Exception as exc:
        if _out_of_memory(exc):
            raise BrokerFull(sent, _where()) from None
        raise
    return sent
