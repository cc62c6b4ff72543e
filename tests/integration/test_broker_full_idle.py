"""An idle consumer on a full Redis (``maxmemory``, ``noeviction``) waits; it neither stops nor
is declared dead.

With nothing to take, the reliable fetch blocks on a queue key with ``BLMOVE``, a command a full
Redis refuses (``BRPOPLPUSH`` too; kombu's ``BRPOP`` only removes, and is let through). The
refusal came out of the poll as ``OutOfMemoryError``, which Celery does not retry: "Unrecoverable
error", and the worker stopped consuming for good (tests/chaos/test_redis_full.py, after its
backlog drained with Redis still over the limit: "385 of 570 events recorded", ci55). And the
heartbeat, a plain SET, was refused too: a healthy consumer was declared dead after its TTL, and
its messages handed to others.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any

import redis
from kombu import Connection, Exchange, Queue
from kombu.message import Message

from tests.chaos.conftest import PrivateRedis
from worker import redisbroker
from worker.celery import transport_options

QUEUE = Queue("full-idle", Exchange("full-idle", type="direct"), routing_key="full-idle")
FULL_SECONDS = 3.0


def publish(server: PrivateRedis, n: int) -> None:
    with Connection(server.url) as conn:
        conn.Producer().publish(
            {"n": n}, exchange=QUEUE.exchange, routing_key="full-idle", declare=[QUEUE]
        )


def drain_for(conn: Connection, seconds: float, done: Any = lambda: False) -> None:
    """Consume as a worker's loop does, for ``seconds`` or until ``done()``; any error but an
    idle poll's timeout is the worker's loop dying."""
    deadline = time.monotonic() + seconds
    while not done() and time.monotonic() < deadline:
        with contextlib.suppress(TimeoutError):
            conn.drain_events(timeout=0.2)


def test_an_idle_consumer_waits_out_a_full_redis(
    private_redis: PrivateRedis, redis_fetch: type
) -> None:
    """Idle, Redis full for longer than the heartbeat's TTL: polling raises nothing, the
    consumer stays registered alive, and takes the next message once the limit is lifted."""
    received: list[Message] = []
    admin = redis.Redis.from_url(private_redis.url)
    publish(private_redis, 0)  # declares the queue's binding
    options = transport_options(private_redis.url, consumer_ttl=1.0)
    with Connection(private_redis.url, transport=redis_fetch, transport_options=options) as conn:
        channel = conn.channel()
        consumer = conn.Consumer(
            QUEUE, channel=channel, callbacks=[lambda _, m: received.append(m)]
        )
        consumer.qos(prefetch_count=1)
        with consumer:
            drain_for(conn, 5, lambda: received)
            received.pop().ack()
            drain_for(conn, 0.5)  # idle: the reliable fetch is now blocking on the key
            admin.config_set("maxmemory", 1)
            try:
                drain_for(conn, FULL_SECONDS)
                alive = admin.keys("_accumsync.alive.*")
            finally:
                admin.config_set("maxmemory", 0)
            if redis_fetch is redisbroker.Transport:
                assert alive == [redisbroker.alive_key(channel.consumer).encode()], alive
            publish(private_redis, 1)
            drain_for(conn, 10, lambda: received)
            assert [m.payload for m in received] == [{"n": 1}]
            received[0].ack()
