"""Broker-level poison: messages the broker delivers but no task can run (a body that is not
JSON, a foreign content type, an unknown task, arguments of the wrong shape), pushed raw onto the
Redis queue (``LPUSH``) or published raw to the RabbitMQ queue as a foreign producer's bug would,
each become a dead letter with its reason, size, sha256 and a truncated body; nothing of the body
reaches the logs; the worker goes on."""

from __future__ import annotations

import base64
import json
import uuid
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from typing import Any

import pytest
import redis

from tests.rabbitmq import private_vhost, publish_raw
from tests.stack import Stack
from worker.demo.procs import wait_for

pytestmark = pytest.mark.integration

MEMBER = "XQ7770001"  # a member id only the bodies carry: the logs must not show it


def envelope(queue: str, body: bytes, content_type: str, headers: dict[str, Any]) -> str:
    """A message as kombu's Redis transport stores it in the queue's list."""
    return json.dumps(
        {
            "body": base64.b64encode(body).decode(),
            "content-encoding": "utf-8",
            "content-type": content_type,
            "headers": headers,
            "properties": {
                "body_encoding": "base64",
                "delivery_tag": str(uuid.uuid4()),
                "delivery_info": {"exchange": "", "routing_key": queue},
                "priority": 0,
                "correlation_id": headers.get("id", "x"),
            },
        }
    )


#: Pushes one raw message onto a queue: (queue, body, content type, headers).
Push = Callable[[str, bytes, str, dict[str, Any]], None]


@pytest.fixture(params=["redis", "amqp"])
def broker(request: pytest.FixtureRequest) -> Iterator[tuple[str, Push]]:
    """A broker URL and a way to push raw messages onto it: ``LPUSH`` of kombu's envelope on
    Redis; a raw publish (no serializer, publisher confirms) on RabbitMQ, in a vhost of its own."""
    with ExitStack() as exits:
        if request.param == "redis":
            url = request.getfixturevalue("redis_url")
            client = exits.enter_context(redis.Redis.from_url(url))

            def push(q: str, body: bytes, ctype: str, headers: dict[str, Any]) -> None:
                client.lpush(q, envelope(q, body, ctype, headers))
        else:
            _, url = exits.enter_context(private_vhost(request.getfixturevalue("amqp_url")))

            def push(q: str, body: bytes, ctype: str, headers: dict[str, Any]) -> None:
                publish_raw(url, q, body, ctype, headers)

        yield url, push


def task_headers(name: str) -> dict[str, Any]:
    tid = str(uuid.uuid4())
    return {"lang": "py", "task": name, "id": tid, "root_id": tid, "argsrepr": "()"}


def event(n: int) -> dict[str, Any]:
    return {
        "event_id": f"ok-{n}",
        "claim_id": f"c-{n}",
        "version": 1,
        "status": "adjudicated",
        "subscriber_id": "S0000001",
        "group_id": "G1",
        "plan_year": "2026",
        "plan_type": "MED",
        "benefit_code": "DED",
        "network": "in",
        "amounts": {"copay": "5.00"},
    }


def test_each_undeliverable_message_is_a_dead_letter_and_the_worker_goes_on(
    make_stack: Callable[..., Stack], broker: tuple[str, Push], pg_url: str
) -> None:
    """Five poison messages, pushed raw: five dead letters of source broker; the next batch is
    applied."""
    broker_url, push = broker
    stack = make_stack(database_url=pg_url, broker_url=broker_url)
    stack.migrate()
    worker = stack.worker("w1")  # declares its queues (RabbitMQ routes nothing to none)
    secret_event = json.dumps([[{"subscriber_id": MEMBER}], {}, {}]).encode()
    poison = [
        (
            b'[[{"subscriber_id": "' + MEMBER.encode() + b'"',
            "application/json",
            task_headers("accumsync.ingest"),
        ),
        (
            b"\x80\x04" + MEMBER.encode(),
            "application/x-python-serialize",
            task_headers("accumsync.ingest"),
        ),
        (secret_event, "application/json", task_headers("accumsync.no_such_task")),
        (
            json.dumps([[1, 2], {"x": MEMBER}, {}]).encode(),
            "application/json",
            task_headers("accumsync.ingest"),
        ),
        (  # compressed, says its header (as publish's are), but it is not
            b"not zstd " + secret_event,
            "application/json",
            task_headers("accumsync.ingest") | {"compression": "application/zstd"},
        ),
    ]
    for body, content_type, headers in poison:
        push(stack.queue, body, content_type, headers)
    stack.publish([event(1), event(2)])  # the worker goes on: the next batch is applied

    def letters() -> list[dict[str, Any]]:
        proc = stack.cli("dead-letters", "list", "--source", "broker", "--json", "--show-payload")
        return list(json.loads(proc.stdout))

    assert wait_for(lambda: len(letters()) == 5, 60, 0.5), worker.output()[-3000:]
    assert stack.status()["applied"] == 2
    kinds = sorted(row["kind"] for row in letters())
    assert kinds == ["bad_arguments", "invalid_task", "undecodable", "undecodable", "unknown_task"]
    found = {row["kind"]: row for row in letters()}
    for row in letters():
        payload = json.loads(row["payload"])
        assert payload["size"] > 0 and len(payload["sha256"]) == 64 and MEMBER in payload["body"]
    assert "accumsync.no_such_task" in found["unknown_task"]["reason"]
    assert "'application/x-python-serialize' is not accepted" in found["invalid_task"]["reason"]
    undecodable = sorted(row["reason"] for row in letters() if row["kind"] == "undecodable")
    assert all("can't be decoded" in reason for reason in undecodable), undecodable
    assert [", compression 'application/zstd'" in reason for reason in undecodable] == [
        False,
        True,
    ], undecodable
    assert "one argument, a list of events" in found["bad_arguments"]["reason"]
    assert MEMBER not in stack.logs(), "a message body reached the logs"
    assert "broker.undeliverable" in worker.output()
    replay = stack.cli("dead-letters", "replay", "--source", "broker")
    assert "not replayed" in replay.stderr and len(letters()) == 5
