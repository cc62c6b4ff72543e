"""A full Redis (``maxmemory``, ``noeviction``) and kombu's acknowledgement emulation: a message
taken while full is delivered, acknowledged, and put back by a stopping consumer, never lost."""

from __future__ import annotations

import json
import subprocess

import redis
from kombu import Connection, Exchange, Queue

from tests.chaos.conftest import PrivateRedis
from worker.redisbroker import Transport


def redis_cli(server: PrivateRedis, *args: str) -> str:
    argv = ["redis-cli", "-p", str(server.port), *args]
    return subprocess.run(argv, capture_output=True, text=True, check=True, timeout=10).stdout


def fill(server: PrivateRedis) -> None:
    """Full from now on: the limit below what is already used."""
    used = next(
        int(line.split(":")[1])
        for line in redis_cli(server, "info", "memory").splitlines()
        if line.startswith("used_memory:")
    )
    redis_cli(server, "config", "set", "maxmemory", str(used // 2))


QUEUE = Queue("full-test", Exchange("full-test", type="direct"), routing_key="full-test")


def queued(server: PrivateRedis) -> int:
    return int(redis_cli(server, "llen", "full-test").strip())


def test_taken_while_full_is_delivered_acked_and_put_back(
    private_redis: PrivateRedis,
) -> None:
    """Full: a message taken is delivered (kombu raised and lost it), acknowledged without
    error; one still held when its consumer stops goes back on the queue once Redis has room."""
    with Connection(private_redis.url, transport=Transport) as conn:  # the worker's transport
        producer = conn.Producer()
        for n in range(3):
            producer.publish(
                {"n": n}, exchange=QUEUE.exchange, routing_key="full-test", declare=[QUEUE]
            )
        assert queued(private_redis) == 3
        fill(private_redis)
        channel = conn.channel()
        first = QUEUE(channel).get(no_ack=False)
        assert first is not None and first.payload == {"n": 0}
        first.ack()
        held = QUEUE(channel).get(no_ack=False)
        assert held is not None and held.payload == {"n": 1}
        assert queued(private_redis) == 1
        redis_cli(private_redis, "config", "set", "maxmemory", "0")  # room again
        channel.qos.restore_unacked()  # what a stopping worker does
        assert queued(private_redis) == 2
        payloads = []
        while (message := QUEUE(channel).get(no_ack=True)) is not None:
            payloads.append(message.payload)
        assert sorted(p["n"] for p in payloads) == [1, 2]


def test_the_unacked_record_is_the_message_as_taken(private_redis: PrivateRedis) -> None:
    """The record of a taken message (its own JSON text spliced in, not encoded again) reads
    back as kombu's ``[payload, exchange, routing key]``, and a restore puts that payload back:
    same body, same headers, marked redelivered."""
    body = {"events": [{"event_id": f'é-{n}\\u2028"', "amount": "1.05"} for n in range(2_000)]}
    with Connection(private_redis.url, transport=Transport) as conn:
        conn.Producer().publish(
            body, exchange=QUEUE.exchange, routing_key="full-test", declare=[QUEUE]
        )
        channel = conn.channel()
        taken = QUEUE(channel).get(no_ack=False)
        assert taken is not None
        client = redis.Redis(port=private_redis.port)
        record = client.hget(channel.qos.unacked_key, taken.delivery_tag)
        assert record is not None
        assert json.loads(record) == [taken._raw, "full-test", "full-test"]
        channel.qos.restore_unacked()
        again = QUEUE(channel).get(no_ack=False)
        assert again is not None and again.payload == body
        assert again.headers == taken.headers | {"redelivered": True}
        assert again.delivery_info["redelivered"] is True
        again.ack()
