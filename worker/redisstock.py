"""kombu's own Redis fetch (``ACCUMSYNC_BROKER_FETCH=kombu``: the way back, and bench.ingest's
baseline), kept safe when Redis is full; worker/redisbroker.py's reliable fetch is the default.

Redis as broker when it is full (``maxmemory``, ``noeviction``): consume on, so memory frees.

Full, Redis refuses every command that may grow memory, and every command queued in a MULTI,
deletes included. kombu's acknowledgement emulation then fails in three places, each fatal or
lossy for a worker (measured by tests/chaos/test_redis_full.py):

- a message taken from its queue (BRPOP frees its memory) is recorded as unacknowledged with
  ZADD and HSET in a MULTI; refused, the worker stops ("Unrecoverable error") and the message,
  no longer in the queue nor recorded, is lost;
- a worker starting takes the restore lock with SET NX; refused, it exits at start-up;
- an ack removes the record with ZREM and HDEL in a MULTI; refused, it stays for redelivery.

:class:`FullSafeQoS` runs a message it could not record (its tasks are idempotent and short: the
window where a killed worker loses it is the task's run, not the whole time Redis is full; a
worker stopping puts such a message back on its queue, if Redis takes it by then),
acknowledges with the same deletes outside a MULTI (which a full Redis accepts, and which free
memory), and skips a restore pass it cannot lock: the next one, every few seconds, restores.
Draining the queue is what frees the memory, so the workers must keep doing it.

:class:`Transport` is kombu's Redis transport with this QoS, named in the app's configuration
(``broker_transport``, worker/celery.py) for ``redis://`` and ``rediss://`` brokers. It overrides
kombu's private QoS methods: pyproject bounds kombu to the minor version it was written against.
"""

from __future__ import annotations

from typing import Any

from kombu.transport import redis, virtual
from kombu.utils.json import dumps
from redis.exceptions import OutOfMemoryError

from worker import failpoints
from worker.logs import Log
from worker.redisfull import SkipRestoreWhenFull

log = Log("broker")


class FullSafeQoS(SkipRestoreWhenFull, redis.QoS):
    """kombu's Redis QoS, carrying on when Redis is out of memory (see the module's docstring)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        #: Messages taken but not recorded in Redis: (body, exchange, routing key) by tag.
        self._unrecorded: dict[str, tuple[Any, str, str]] = {}

    def append(self, message: Any, delivery_tag: str) -> None:
        failpoints.hit("broker.after_take")
        try:
            super().append(message, delivery_tag)
        except OutOfMemoryError:
            log.warning("broker.full.unrecorded", tag=delivery_tag)
            info = message.delivery_info
            self._unrecorded[delivery_tag] = (message._raw, info["exchange"], info["routing_key"])
            virtual.QoS.append(self, message, delivery_tag)  # kept in memory, run as usual

    def restore_by_tag(self, tag: str, client: Any = None, leftmost: bool = False) -> None:
        """An unrecorded message goes back on its queue from memory (kombu would look for it in
        the unacked hash, find nothing, and so drop it): a worker stopping holds none."""
        unrecorded = self._unrecorded.pop(tag, None)
        if unrecorded is None:
            super().restore_by_tag(tag, client, leftmost)
            return
        payload, exchange, routing_key = unrecorded
        channel: Any = self.channel
        try:
            with channel.conn_or_acquire(client) as conn:
                for queue in channel._lookup(exchange, routing_key):
                    key = channel._q_for_pri(queue, channel._get_message_priority(payload, False))
                    (conn.lpush if leftmost else conn.rpush)(key, dumps(payload))
        except OutOfMemoryError:  # never kombu's "Could not restore message: <the body>"
            log.error("broker.full.message_lost", tag=tag)

    def reject(self, delivery_tag: str, requeue: bool = False) -> None:
        if not requeue:
            self.ack(delivery_tag)
            return
        try:
            self.restore_by_tag(delivery_tag, leftmost=True)  # above
        finally:
            virtual.QoS.ack(self, delivery_tag)  # the slot back, as for an ack

    def ack(self, delivery_tag: str) -> None:
        """Remove the record. An ack Redis did not take (a partition times it out; Celery logs
        "Couldn't ack" and goes on) still frees the prefetch slot: kombu keeps it until Redis
        answers, and a worker whose every slot was so held (one, at ``-c 1``) never took a
        message again. The record left behind is redelivered after the visibility timeout, and
        the ledger counts its events once."""
        self._unrecorded.pop(delivery_tag, None)
        try:
            self._remove_from_indices(delivery_tag).execute()  # type: ignore[attr-defined]
        except OutOfMemoryError:
            channel: Any = self.channel  # kombu's Redis channel (typed as the virtual one)
            with channel.conn_or_acquire() as client:
                client.zrem(self.unacked_index_key, delivery_tag)
                client.hdel(self.unacked_key, delivery_tag)
        finally:
            virtual.QoS.ack(self, delivery_tag)


class Channel(redis.Channel):
    """kombu's Redis channel with :class:`FullSafeQoS`."""

    QoS = FullSafeQoS

    def _do_restore_message(self, *args: Any, **kwargs: Any) -> None:
        failpoints.hit("broker.restore")
        super()._do_restore_message(*args, **kwargs)  # type: ignore[misc]


class Transport(redis.Transport):
    """kombu's Redis transport with :class:`Channel`: ``worker.redisstock:Transport``."""

    Channel = Channel
