"""An acknowledgement lost to a network partition: the consumer's prefetch slot comes back.

kombu forgets a delivered message in memory only once Redis has taken its ack. A partition that
timed the ack out (Celery logs "Couldn't ack" and goes on) left the message counted against
``prefetch_count`` for good: at prefetch 1 (``-c 1``) that worker never took another message,
up and healthy by every other sign (tests/chaos/test_broker.py saw "829 of 952 events
recorded" so). Both Redis fetches, the reliable one and kombu's, are held to it.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any

import pytest
import redis
from kombu import Connection, Exchange, Queue
from kombu.message import Message

from tests.chaos.conftest import PrivateRedis
from tests.chaos.netfault import Relay
from worker import redisbroker
from worker.celery import transport_options

QUEUE = Queue("lost-ack", Exchange("lost-ack", type="direct"), routing_key="lost-ack")


def publish(server: PrivateRedis, n: int) -> None:
    """Straight to Redis, around the relay, as the chaos tests' producers do."""
    with Connection(server.url) as conn:
        conn.Producer().publish(
            {"n": n}, exchange=QUEUE.exchange, routing_key="lost-ack", declare=[QUEUE]
        )


def drain_until(conn: Connection, done: Any, seconds: float) -> None:
    """Consume on the same channel through what the partition left behind: a take sent on a
    silenced connection fails, and kombu reconnects at the next poll (as after its health
    check drops one); the channel, and its memory of what it holds, stay."""
    deadline = time.monotonic() + seconds
    while not done() and time.monotonic() < deadline:
        with contextlib.suppress(TimeoutError, *conn.connection_errors):
            conn.drain_events(timeout=0.5)


def test_an_ack_lost_to_a_partition_does_not_stop_the_consumer(
    private_redis: PrivateRedis, redis_fetch: type
) -> None:
    """Prefetch 1, the ack times out in a partition: after the heal the next message is taken,
    and the first one's record is cleared (reliable) or kept for redelivery (kombu's)."""
    relay = Relay(private_redis.port).start()
    url = f"redis://127.0.0.1:{relay.port}/0"
    received: list[Message] = []
    try:
        publish(private_redis, 1)
        options = transport_options(url, health_check_interval=1.0)  # the ack times out in 6 s
        with Connection(url, transport=redis_fetch, transport_options=options) as conn:
            channel = conn.channel()
            consumer = conn.Consumer(
                QUEUE, channel=channel, callbacks=[lambda _, m: received.append(m)]
            )
            consumer.qos(prefetch_count=1)
            with consumer:
                drain_until(conn, lambda: received, 10)
                relay.partition()
                with pytest.raises(redis.exceptions.TimeoutError):
                    received[0].ack()  # Celery: "Couldn't ack", and the worker goes on
                relay.heal()
                publish(private_redis, 2)
                drain_until(conn, lambda: len(received) > 1, 30)
                held = len(channel.qos._delivered)
                payloads = [m.payload for m in received]
                assert payloads == [{"n": 1}, {"n": 2}], f"after the heal, {held} held: {payloads}"
                received[1].ack()
                first = received[0].delivery_tag
                records = redis.Redis.from_url(private_redis.url)
                if redis_fetch is redisbroker.Transport:  # settled by the next heartbeat
                    drain_until(conn, lambda: not records.hexists("unacked", first), 10)
                    assert not records.hkeys("unacked") and not records.smembers(channel.owned)
                else:  # the record stays, for a redelivery after the visibility timeout
                    assert records.hkeys("unacked") == [first.encode()]
    finally:
        relay.stop()
