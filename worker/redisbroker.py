"""Redis as broker: no message lost when a worker is killed, and consuming on when Redis is full.

**Reliable fetch.** kombu's Redis transport takes a message with BRPOP and only then records it
as unacknowledged (ZADD and HSET). A worker's main process killed between the two (SIGKILL, the
OOM killer, a node evicted) loses the message, and with it up to 500 claims, with nothing in the
ledger to show they were ever sent (``bench.soak --faults worker_kill`` lost 914 events so).
Here a message is taken by an atomic move into a list its consumer owns, and is never anywhere
but in Redis until a worker has it recorded:

- **take**: a script moves the first message of the consumer's queue keys (each queue's
  priority steps) into that consumer's *taken* list (``RPOPLPUSH``). With nothing to take, the
  consumer blocks on one of its keys with ``BLMOVE`` (``BRPOPLPUSH`` before Redis 6.2) for
  :attr:`Channel.take_wait`, a different key each time;
- **record**: one MULTI records the message as kombu does (``unacked``, ``unacked_index``), adds
  its delivery tag to the consumer's *owned* set and pops it from the taken list;
- **acknowledge**: removes the record and the tag;
- **heartbeat**: each consumer keeps a key with a TTL (``consumer_ttl``, 10 s by default) and
  registers its queue keys; every heartbeat, one consumer at a time (a lock) sweeps the consumers
  whose key has expired: their taken lists go back to their queues (one script, atomic), their
  owned messages are restored. A killed worker's messages are back within about the TTL, where
  kombu's wait out ``visibility_timeout`` (300 s here), which still applies to a live worker's;
- **restore** (visibility timeout, a worker stopping, a dead consumer's owned tags): the record
  is read and, in one MULTI, deleted and pushed back; a restore that cannot name the message's
  queue raises and keeps the record, where kombu deletes it and logs the body.

This is the model of Sidekiq Pro's ``super_fetch`` (a private in-progress list per process, a
heartbeat, any live process recovering the lists of dead ones), not RQ's intermediate queue
(one list per queue, recovered only once a worker's death is noticed by its registry's
cleanup) nor Resque's reliable-fetch discussion (a per-worker list re-read at that worker's own
restart, so a worker that never restarts strands its messages). It needs nothing from the
producers, which still push to the plain list any Celery client writes to, and a dead
consumer's messages come back in seconds whoever is left. A message can be delivered twice (a
consumer declared dead while only slow, a kill after the record and before the ack): the
ledger counts an event id once.

**Full Redis** (``maxmemory``, ``noeviction``): Redis refuses every command that may grow memory,
and every command queued in a MULTI, deletes included (measured by
tests/chaos/test_redis_full.py). The take and give-back scripts carry ``allow-oom`` (they move
memory, they do not grow it), so the workers keep draining, which is what frees the memory; so
does the heartbeat's (it rewrites two values in place), so a consumer is not declared dead for
Redis being full. ``BLMOVE`` is refused: an idle consumer waits on a stream no one writes to
(``XREAD``, read-only) between takes instead, where the refusal used to stop the worker. A
message whose record is refused stays in the taken list, runs as usual (its task is idempotent
and short), and is acknowledged or put back from there; acknowledgements fall back to plain
deletes outside a MULTI; a restore pass that cannot lock is skipped (the next one restores).

:class:`Transport` is named in the app's configuration (``broker_transport``, worker/celery.py)
for ``redis://`` and ``rediss://`` brokers. It overrides private methods of kombu's Redis
transport: pyproject bounds kombu to the minor version it was written against.
"""

from __future__ import annotations

import json
import os
from contextlib import suppress
from dataclasses import dataclass
from time import monotonic, time
from typing import Any
from uuid import uuid4

from kombu.transport import redis, virtual
from kombu.utils.encoding import bytes_to_str
from kombu.utils.json import dumps, loads
from redis.exceptions import OutOfMemoryError

from worker import failpoints
from worker.logs import Log
from worker.redisfull import SkipRestoreWhenFull

log = Log("broker")

#: Field: a consumer's id; value: the JSON list of the queue keys it takes from.
CONSUMERS = "_accumsync.consumers"
SWEEP_LOCK = "_accumsync.sweep"
#: Where an item that is not a kombu message (not JSON) goes, kept for a person to read.
UNREADABLE = "_accumsync.unreadable"

TAKE = """
local n = tonumber(ARGV[1])
for i = 1, n do
  local item = redis.call('RPOPLPUSH', KEYS[i], KEYS[n + i])
  if item then return {i, item} end
end
return false
"""
#: KEYS: taken list, its queue, taken list, its queue...: each list's items back to the head of
#: its queue (the next to be taken), oldest first.
GIVE_BACK = """
local moved = 0
for i = 1, #KEYS, 2 do
  local item = redis.call('LPOP', KEYS[i])
  while item do
    redis.call('RPUSH', KEYS[i + 1], item)
    moved = moved + 1
    item = redis.call('LPOP', KEYS[i])
  end
end
return moved
"""
#: One message from a taken list back to its queue, if it is still there.
PUT_BACK = """
if redis.call('LREM', KEYS[1], 1, ARGV[1]) == 1 then
  redis.call(ARGV[2], KEYS[2], ARGV[1])
  return 1
end
return 0
"""
#: KEYS: the consumer's heartbeat key, the registry; ARGV: TTL (ms), the consumer, its queue keys.
#: A script, so that it carries ``allow-oom``: it rewrites two values in place.
HEARTBEAT = """
redis.call('SET', KEYS[1], '1', 'PX', ARGV[1])
redis.call('HSET', KEYS[2], ARGV[2], ARGV[3])
return 1
"""
#: A stream no one writes to: a full Redis's idle consumer waits on it (XREAD, read-only).
IDLE = "_accumsync.idle"
RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


def taken_key(consumer: str, queue_key: str) -> str:
    return f"_accumsync.taken.{consumer}.{queue_key}"


def owned_key(consumer: str) -> str:
    return f"_accumsync.owned.{consumer}"


def alive_key(consumer: str) -> str:
    return f"_accumsync.alive.{consumer}"


@dataclass(frozen=True)
class Taken:
    """A message in a consumer's taken list: the list, the queue key it came from, its bytes."""

    list: str
    queue_key: str
    item: bytes


def unacked_record(message: Any, taken: Taken | None) -> str | bytes:
    """What kombu records for an unacknowledged message: the JSON of ``[payload, exchange,
    routing key]``. With the taken bytes at hand, the payload's own JSON text is spliced in
    instead of the parsed payload encoded again: for a message of 2,000 events (a megabyte of
    base64 body) that encoding was a tenth of the worker's main process's time. kombu leaves
    the payload it parsed as it was (``Message`` reads it, never writes it), so both are the
    same record."""
    delivery = message.delivery_info
    route = [delivery["exchange"], delivery["routing_key"]]
    if taken is None:
        return str(dumps([message._raw, *route]))
    item = taken.item if isinstance(taken.item, bytes) else str(taken.item).encode()
    return b"[" + item + b"," + str(dumps(route))[1:].encode()


class ReliableQoS(SkipRestoreWhenFull, redis.QoS):
    """kombu's Redis QoS recording from, and acknowledging into, the consumer's own keys."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        #: Messages Redis (full) refused to record: still in the taken list, by tag.
        self.unrecorded: dict[str, Taken] = {}
        #: Acks lost with the connection, by tag (with the taken list entry, if unrecorded).
        self.lost_acks: dict[str, Taken | None] = {}

    def append(self, message: Any, delivery_tag: str) -> None:
        failpoints.hit("broker.after_take")
        channel: Channel = self.channel  # type: ignore[assignment]
        taken = channel.hand_over()
        record = unacked_record(message, taken)
        try:
            with channel.conn_or_acquire() as client:
                pipe = client.pipeline()
                pipe.zadd(self.unacked_index_key, {delivery_tag: time()})
                pipe.hset(self.unacked_key, delivery_tag, record)
                if taken is not None:
                    pipe.sadd(channel.owned, delivery_tag)
                    pipe.lpop(taken.list)
                pipe.execute()
        except OutOfMemoryError:
            log.warning("broker.full.unrecorded", tag=delivery_tag, kept=taken is not None)
            if taken is not None:
                self.unrecorded[delivery_tag] = taken  # safe in the taken list; runs as usual
        virtual.QoS.append(self, message, delivery_tag)

    def ack(self, delivery_tag: str) -> None:
        """Remove the record and the tag. An ack Redis did not take (a partition times it out;
        Celery logs "Couldn't ack" and goes on) still frees the prefetch slot, and is tried
        again at the next heartbeat: kombu keeps the slot until Redis answers, and a worker
        whose every slot was so held (one, at ``-c 1``) never took a message again."""
        taken = self.unrecorded.pop(delivery_tag, None)
        channel: Channel = self.channel  # type: ignore[assignment]
        try:
            with channel.conn_or_acquire() as client:
                try:
                    self._forget(client.pipeline(), delivery_tag, taken).execute()
                except OutOfMemoryError:  # a full Redis takes the same deletes outside a MULTI
                    self._forget(client.pipeline(transaction=False), delivery_tag, taken).execute()
        except channel.connection_errors:
            self.lost_acks[delivery_tag] = taken
            raise
        finally:
            virtual.QoS.ack(self, delivery_tag)

    def settle_lost_acks(self, client: Any) -> None:
        """The acks Redis did not take, again (each heartbeat); one left over past the
        visibility timeout is only redelivered, and the ledger counts its events once."""
        for tag, taken in list(self.lost_acks.items()):
            self._forget(client.pipeline(transaction=False), tag, taken).execute()
            del self.lost_acks[tag]
            log.info("broker.ack_settled", tag=tag)

    def _forget(self, pipe: Any, tag: str, taken: Taken | None) -> Any:
        pipe.zrem(self.unacked_index_key, tag).hdel(self.unacked_key, tag)
        pipe.srem(self.channel.owned, tag)  # type: ignore[attr-defined]
        if taken is not None:
            pipe.lrem(taken.list, 1, taken.item)
        return pipe

    def reject(self, delivery_tag: str, requeue: bool = False) -> None:
        """A requeue Redis did not take frees the slot too: the record comes back with the
        visibility timeout, a message never recorded with the next heartbeat's give-back."""
        if not requeue:
            self.ack(delivery_tag)
            return
        try:
            self.restore_by_tag(delivery_tag, leftmost=True)
        finally:
            virtual.QoS.ack(self, delivery_tag)

    def restore_unacked(self, client: Any = None) -> None:
        """What a closing channel still holds, back on its queues; with its connection already
        closed under it (a broker restart), left for the sweep: every such message is in this
        consumer's taken list or owned set, and a live worker gives them back once this
        consumer's heartbeat lapses (kombu's would raise here, and stop the worker)."""
        channel: Channel = self.channel  # type: ignore[assignment]
        if getattr(channel.connection, "client", None) is None:
            held = self._delivered
            log.warning("broker.restore_left_to_sweep", messages=len(held) if held else 0)
            if held:
                held.clear()
            return
        super().restore_unacked(client)

    def restore_by_tag(self, tag: str, client: Any = None, leftmost: bool = False) -> None:
        """Back on its queue: from the taken list if it was never recorded, else from its record
        (kombu's transaction: read, then delete and push in one MULTI). A record whose queue
        cannot be named stays where it is, logged by its tag."""
        channel: Channel = self.channel  # type: ignore[assignment]
        taken = self.unrecorded.pop(tag, None)
        try:
            if taken is not None:
                with channel.conn_or_acquire(client) as conn:
                    push = "LPUSH" if leftmost else "RPUSH"
                    keys = (taken.list, taken.queue_key)
                    conn.eval(channel.script(PUT_BACK), 2, *keys, taken.item, push)
                return
            super().restore_by_tag(tag, client, leftmost)
        except channel.connection_errors:
            raise
        except OutOfMemoryError:
            log.debug("broker.full.restore_skipped", tag=tag)
        except Exception as exc:  # the record stays; the next pass tries again
            log.error("broker.restore_failed", tag=tag, error=type(exc).__name__)


class Channel(redis.Channel):
    """kombu's Redis channel taking each message by an atomic move (see the module)."""

    QoS = ReliableQoS
    #: Seconds a consumer's heartbeat lasts: its messages go back this long after it dies.
    consumer_ttl = 10.0
    #: Seconds a consumer with nothing to take blocks on one of its queue keys at a time.
    take_wait = 0.1

    from_transport_options = (*redis.Channel.from_transport_options, "consumer_ttl")
    # kombu's Redis channel's own, untyped in its stubs
    connection_errors: tuple[type[BaseException], ...]
    _queue_cycle: Any
    _q_for_pri: Any
    _flush_brpop_reauth: Any

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.consumer = f"{os.getpid()}.{uuid4().hex[:12]}"
        self.owned = owned_key(self.consumer)
        #: Queue keys registered under this consumer (a take needs its key registered first).
        self.sources: set[str] = set()
        self._pending: Taken | None = None
        self._taking: tuple[str, ...] = ()
        self._blocking = False
        #: A full Redis refused the last blocking move: wait without moving, then take.
        self._full_wait = False
        self._block_turn = 0
        self._next_beat = 0.0
        self._modern: bool | None = None
        super().__init__(*args, **kwargs)

    # -- taking ----------------------------------------------------------------------------

    def _brpop_start(self, timeout: float | None = None) -> None:
        queues = self._queue_cycle.consume(len(self.active_queues))
        if not queues:
            return
        keys = tuple(
            dict.fromkeys(self._q_for_pri(q, p) for p in self.priority_steps for q in queues)
        )
        if not self.sources.issuperset(keys):
            self.sources.update(keys)
            self.keep_alive(force=True)
        if self._blocking:
            key = keys[self._block_turn % len(keys)]
            self._block_turn += 1
            self._taking = (key,)
            if self._full_wait:
                self._full_wait = False
                command = ["XREAD", "BLOCK", str(int(self.take_wait * 1000)), "STREAMS", IDLE, "$"]
            elif self.modern():
                command = ["BLMOVE", key, taken_key(self.consumer, key), "RIGHT", "LEFT"]
                command.append(str(self.take_wait))
            else:
                command = ["BRPOPLPUSH", key, taken_key(self.consumer, key), "1"]
        else:
            self._taking = keys
            lists = [taken_key(self.consumer, k) for k in keys]
            command = ["EVAL", self.script(TAKE), str(2 * len(keys)), *keys, *lists]
            command.append(str(len(keys)))
        self._in_poll = self.client.connection
        self._brpop_sent_at = monotonic()
        self.client.connection.send_command(*command)

    def _brpop_read(self, **options: Any) -> bool:
        try:
            try:
                reply = self.client.parse_response(self.client.connection, "EVAL", **options)
            except self.connection_errors:
                self.client.connection.disconnect()
                raise
            except OutOfMemoryError:
                if not self._blocking:  # the take script carries allow-oom
                    raise
                # A full Redis refuses BLMOVE (and BRPOPLPUSH), which Celery would not survive:
                # next time a wait that moves nothing (XREAD on IDLE), then the take script.
                self._full_wait, reply = True, None
            if self._blocking:
                key, item = self._taking[0], reply
            elif reply:
                key, item = self._taking[int(reply[0]) - 1], reply[1]
            else:
                key, item = "", None
            self._blocking = item is None and not self._blocking
            if item is None:
                raise virtual.Empty()
            queue = key.rsplit(self.sep, 1)[0]
            self._queue_cycle.rotate(queue)
            self._deliver_taken(Taken(taken_key(self.consumer, key), key, item), queue)
            return True
        finally:
            self._in_poll = None
            self._flush_brpop_reauth()

    def _deliver_taken(self, taken: Taken, queue: str) -> None:
        try:
            payload = loads(bytes_to_str(taken.item))
        except ValueError:
            with self.conn_or_acquire() as client:
                keys = (taken.list, UNREADABLE)
                client.eval(self.script(PUT_BACK), 2, *keys, taken.item, "LPUSH")
            log.error("broker.unreadable", queue=queue, bytes=len(taken.item), kept_in=UNREADABLE)
            return
        self._pending = taken
        try:
            self.connection._deliver(payload, queue)
        finally:
            self._drop_pending()

    def _get(self, queue: str, timeout: float | None = None) -> Any:
        """``basic_get``'s take: the same atomic move, without blocking."""
        keys = tuple(self._q_for_pri(queue, p) for p in self.priority_steps)
        if not self.sources.issuperset(keys):
            self.sources.update(keys)
            self.keep_alive(force=True)
        lists = [taken_key(self.consumer, k) for k in keys]
        with self.conn_or_acquire() as client:
            reply = client.eval(self.script(TAKE), 2 * len(keys), *keys, *lists, len(keys))
        if not reply:
            raise virtual.Empty()
        key = keys[int(reply[0]) - 1]
        self._pending = Taken(taken_key(self.consumer, key), key, reply[1])
        return loads(bytes_to_str(reply[1]))

    def basic_get(self, queue: str, no_ack: bool = False, **kwargs: Any) -> Any:
        """kombu's, with a message taken and not recorded (``no_ack``) off the taken list."""
        try:
            return super().basic_get(queue, no_ack, **kwargs)
        finally:
            self._drop_pending()

    def _drop_pending(self) -> None:
        """A take delivered without a record (no_ack, refused) leaves the taken list."""
        if self._pending is not None:
            taken, self._pending = self._pending, None
            with self.conn_or_acquire() as client:
                client.lpop(taken.list)

    def hand_over(self) -> Taken | None:
        """The take being delivered, for its record (once)."""
        taken, self._pending = self._pending, None
        return taken

    # -- heartbeat and sweep ---------------------------------------------------------------

    def keep_alive(self, force: bool = False) -> None:
        """Refresh this consumer's heartbeat and registration; sweep dead consumers."""
        now = monotonic()
        if not self.sources or (now < self._next_beat and not force):
            return
        self._next_beat = now + self.consumer_ttl / 4
        qos: ReliableQoS = self.qos  # type: ignore[assignment]
        try:
            with self.conn_or_acquire() as client:
                keys = (alive_key(self.consumer), CONSUMERS)
                ttl, sources = int(self.consumer_ttl * 1000), json.dumps(sorted(self.sources))
                client.eval(self.script(HEARTBEAT), 2, *keys, ttl, self.consumer, sources)
                qos.settle_lost_acks(client)  # before the give-back, which would redeliver
                if not self._in_poll and not qos.unrecorded:
                    self.give_back(client, self.consumer, self.sources)  # nothing should be left
                self.sweep(client)
        except OutOfMemoryError:  # on Redis >= 7 the heartbeat got through (allow-oom) and
            # only the sweep's lock was refused; before 7, scripts carry no flags: both were
            log.debug("broker.full.keep_alive_cut_short")

    def sweep(self, client: Any) -> None:
        """Give back the messages of every consumer whose heartbeat has expired (one sweeper at
        a time)."""
        ttl = int(self.consumer_ttl * 1000)
        if not client.set(SWEEP_LOCK, self.consumer, nx=True, px=ttl):
            return
        try:
            for consumer, sources in client.hgetall(CONSUMERS).items():
                name = bytes_to_str(consumer)
                if name != self.consumer and not client.exists(alive_key(name)):
                    self.bury(client, name, json.loads(sources))
        finally:
            client.eval(RELEASE, 1, SWEEP_LOCK, self.consumer)

    def bury(self, client: Any, consumer: str, sources: list[str]) -> None:
        """A dead consumer's messages back on their queues: those it had taken, then those it
        had recorded and not acknowledged."""
        taken = self.give_back(client, consumer, sources)
        tags = [bytes_to_str(t) for t in client.smembers(owned_key(consumer))]
        recorded = sum(bool(client.hexists(self.unacked_key, tag)) for tag in tags)
        qos: ReliableQoS = self.qos  # type: ignore[assignment]
        for tag in tags:
            qos.restore_by_tag(tag, client)
        client.delete(owned_key(consumer))
        client.hdel(CONSUMERS, consumer)
        log.warning("broker.consumer_swept", consumer=consumer, taken=taken, recorded=recorded)

    def give_back(self, client: Any, consumer: str, sources: Any) -> int:
        keys = [k for source in sorted(sources) for k in (taken_key(consumer, source), source)]
        return int(client.eval(self.script(GIVE_BACK), len(keys), *keys)) if keys else 0

    def modern(self) -> bool:
        """Redis >= 7: scripts may carry flags; >= 6.2 has BLMOVE (asked once)."""
        if self._modern is None:
            with self.conn_or_acquire() as client:
                version = str(client.info("server").get("redis_version", "0"))
            self._modern = tuple(int(p) for p in version.split(".")[:2]) >= (7, 0)
        return self._modern

    def script(self, body: str) -> str:
        """``body`` with the ``allow-oom`` flag where the server knows script flags."""
        return ("#!lua flags=allow-oom" + body) if self.modern() else body

    def _do_restore_message(
        self, payload: Any, exchange: str, routing_key: str, pipe: Any, leftmost: bool = False
    ) -> None:
        """kombu's, raising where it would log the body and let the record be deleted with no
        message pushed (an error, or no queue bound any more)."""
        failpoints.hit("broker.restore")
        with suppress(KeyError):
            payload["headers"]["redelivered"] = True
            payload["properties"]["delivery_info"]["redelivered"] = True
        queues = self._lookup(exchange, routing_key)
        if not queues:
            raise LookupError("no queue bound for the message's exchange and routing key")
        priority = self._get_message_priority(payload, reverse=False)
        for queue in queues:
            (pipe.lpush if leftmost else pipe.rpush)(
                self._q_for_pri(queue, priority), dumps(payload)
            )

    def close(self) -> None:
        """A consumer stopping gives back what it still holds and leaves the registry (a take
        whose answer is still on the wire is delivered first, as kombu does)."""
        if self._in_poll:
            with suppress(virtual.Empty, *self.connection_errors):
                self._brpop_read()  # a take lost with the connection is in the taken list
        if self.sources and not self.closed and getattr(self.connection, "client", None):
            with suppress(Exception), self.conn_or_acquire() as client:
                self.give_back(client, self.consumer, self.sources)
                client.delete(alive_key(self.consumer), self.owned)
                client.hdel(CONSUMERS, self.consumer)
        super().close()


class Poller(redis.MultiChannelPoller):
    """kombu's poller, beating each consuming channel's heart as it polls."""

    _channels: set[Channel]

    def on_poll_start(self) -> None:
        for channel in self._channels:
            if channel.active_queues:
                with suppress(*channel.connection_errors):
                    channel.keep_alive()
        super().on_poll_start()


class Transport(redis.Transport):
    """kombu's Redis transport with :class:`Channel`: ``worker.redisbroker:Transport``."""

    Channel = Channel

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.cycle = Poller()
