"""The embedded broker: kombu's SQLAlchemy transport, with a dead worker's messages delivered again.

kombu's transport marks a message invisible when it hands it out, and never looks at it again: an
ack is only forgotten in memory, so a worker SIGKILLed mid-task (or a machine losing power) loses
the message it held, and with an ingest message its events. Here, as on Redis, a message handed
out is *taken* (a row in ``accumsync_taken`` says when); the worker's ack or reject deletes it,
and a message taken longer ago than the visibility timeout (``ACCUMSYNC_BROKER_VISIBILITY_TIMEOUT``)
is visible again and delivered once more. Every task is idempotent, so a second delivery costs
time, never money. Rows kombu made invisible before this module existed are left alone: nothing
says whether they were acknowledged.

:class:`Transport` serves the embedded broker (worker/celery.py names it in the app's
configuration); it overrides kombu's private channel methods, so pyproject bounds kombu to the
minor version they were written against.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from json import loads
from pathlib import Path
from queue import Empty
from typing import Any, cast

from kombu.transport import sqlalchemy
from kombu.utils.encoding import bytes_to_str
from sqlalchemy import (
    Column,
    CursorResult,
    Engine,
    Float,
    Integer,
    MetaData,
    Table,
    create_engine,
    delete,
    insert,
    text,
    update,
)
from sqlalchemy.engine import make_url
from sqlalchemy.exc import OperationalError

from worker.logs import Log

log = Log("broker")

#: Which message rows are taken, since when (epoch seconds): beside kombu's tables, not in them.
taken_table = Table(
    "accumsync_taken",
    MetaData(),
    Column("message_id", Integer, primary_key=True, autoincrement=False),
    Column("taken_at", Float, nullable=False),
)
#: Transport options that are ours or kombu's, never ``create_engine``'s.
NOT_ENGINE = frozenset(
    {
        "visibility_timeout",
        "queue_tablename",
        "message_tablename",
        "callback",
        "errback",
        "max_retries",
        "interval_start",
        "interval_step",
        "interval_max",
        "retry_errors",
    }
)

_prepared: set[Engine] = set()


class LeasedChannel(sqlalchemy.Channel):
    """kombu's channel, whose messages are taken for a while, not for ever.

    One session serves the consumer loop, which takes messages, and the prefork pool's result
    thread, which acknowledges and requeues them: a lock keeps them apart (without it the two
    broke each other's transactions, and the worker died of a session in 'prepared' state)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        #: Seconds before a taken message comes back (``visibility_timeout``, as on Redis).
        client: Any = self.connection.client  # the kombu Connection
        options: dict[str, Any] = client.transport_options
        self.visibility_timeout = float(options.get("visibility_timeout", 300.0))
        self._lock = threading.RLock()
        self._taken: dict[str, int] = {}  # delivery tag -> message row, of this channel's
        self._swept = 0.0

    def _engine_from_config(self) -> Engine:
        """The engine, given only the options that are ``create_engine``'s, with the SQLite
        file's folder created first (the embedded broker lives under ``ACCUMSYNC_HOME``)."""
        conninfo: Any = self.connection.client  # the kombu Connection
        options = {k: v for k, v in conninfo.transport_options.items() if k not in NOT_ENGINE}
        url = make_url(conninfo.hostname)
        if url.get_backend_name() == "sqlite" and url.database not in (None, "", ":memory:"):
            Path(url.database).expanduser().parent.mkdir(parents=True, exist_ok=True)
        return create_engine(url, **options)

    def _open(self) -> Any:
        engine, session = super()._open()
        if engine not in _prepared:
            taken_table.create(engine, checkfirst=True)
            _prepared.add(engine)
        return engine, session

    def _get(self, queue: str, timeout: float | None = None) -> Any:
        """The queue's oldest visible message, now taken (kombu's query, plus the lease)."""
        with self._lock:
            self._restore_expired()
            obj = self._get_or_create(queue)  # type: ignore[attr-defined]  # kombu's, unannotated
            with self._transaction():
                msg = (
                    self.session.query(self.message_cls)
                    .with_for_update()
                    .filter(self.message_cls.queue_id == obj.id)
                    .filter(self.message_cls.visible != False)  # noqa: E712 (kombu's column)
                    .order_by(self.message_cls.sent_at)
                    .order_by(self.message_cls.id)
                    .limit(1)
                    .first()
                )
                if msg is not None:
                    msg.visible = False
                    self.session.flush()
                    self._lease(msg.id)
                    taken, payload = msg.id, loads(bytes_to_str(msg.payload))
            if msg is None:
                raise Empty()
            self._taken[payload["properties"]["delivery_tag"]] = taken
            return payload

    def _put(self, *args: Any, **kwargs: Any) -> None:
        """kombu's publish (queue, payload), under the lock: the result thread requeues too."""
        with self._lock:
            super()._put(*args, **kwargs)

    def _lease(self, message_id: int) -> None:
        """Record the message as taken now, in the transaction that hides it."""
        self.session.execute(delete(taken_table).where(taken_table.c.message_id == message_id))
        self.session.execute(
            insert(taken_table).values(message_id=message_id, taken_at=time.time())
        )

    def basic_ack(self, delivery_tag: str, multiple: bool = False) -> None:
        super().basic_ack(delivery_tag, multiple)
        self._forget(delivery_tag)

    def basic_reject(self, delivery_tag: str, requeue: bool = False) -> None:
        super().basic_reject(delivery_tag, requeue)  # requeue: a new row, by _restore
        self._forget(delivery_tag)

    def _restore(self, message: Any) -> None:
        """A message given back (rejected with requeue, or unacked at a warm shutdown) is a new
        row; the one it was taken as goes."""
        super()._restore(message)
        self._forget(message.delivery_tag)

    def _forget(self, delivery_tag: str) -> None:
        """Delete a finished message. If the store refuses now, the lease runs out and the
        message comes back once more: a duplicate, which every task takes as one."""
        with self._lock:
            taken = self._taken.pop(delivery_tag, None)
            if taken is None:
                return
            messages = self.message_cls.__table__
            try:
                with self._transaction():
                    self.session.execute(
                        delete(taken_table).where(taken_table.c.message_id == taken)
                    )
                    self.session.execute(delete(messages).where(messages.c.id == taken))
            except OperationalError as exc:
                log.warning("broker.ack_deferred", reason=type(exc.orig).__name__)

    def _restore_expired(self) -> None:
        """Make messages taken longer ago than the visibility timeout visible again; every
        tenth of the timeout (1 to 10 s), as kombu's Redis transport sweeps."""
        now = time.monotonic()
        if now - self._swept < max(1.0, min(10.0, self.visibility_timeout / 10)):
            return
        self._swept = now
        expired = taken_table.c.taken_at < time.time() - self.visibility_timeout
        ids = taken_table.select().with_only_columns(taken_table.c.message_id).where(expired)
        messages = self.message_cls.__table__
        with self._transaction():
            restore = update(messages).where(messages.c.id.in_(ids)).values(visible=True)
            back = cast(CursorResult[Any], self.session.execute(restore)).rowcount
            self.session.execute(delete(taken_table).where(expired))
        if back:
            log.warning("broker.redelivered", messages=back, after_seconds=self.visibility_timeout)

    @contextmanager
    def _transaction(self) -> Iterator[None]:
        """One write transaction on the session, committed, or rolled back on any error (a
        failed commit must not leave the session unusable). SQLite: the write lock is taken
        first, as kombu's ``_get`` does, so two writers never deadlock upgrading a read."""
        try:
            if self.session.get_bind().dialect.name == "sqlite":
                self.session.execute(text("BEGIN IMMEDIATE TRANSACTION"))
            yield
            self.session.commit()
        except BaseException:
            self.session.rollback()
            raise


class Transport(sqlalchemy.Transport):
    """kombu's SQLAlchemy transport with :class:`LeasedChannel`: ``worker.sqlbroker:Transport``.

    It polls every 0.03 s, not kombu's 1 s: with prefetch 1 that is one task per poll, and at
    0.03 s the embedded flush reaches VBA's 25 calls/s (at 0.1 s it made 9.5, at 0.05 s 18); an
    idle worker's main process then spends about 8% of a core polling (2% at 0.1 s), measured
    with bench.flush's embedded phase. A larger prefetch would be faster still, but a killed
    worker's prefetched messages would wait out the visibility timeout."""

    Channel = LeasedChannel
    polling_interval = 0.03
