"""Publishing to RabbitMQ with publisher confirms: a message the broker refuses is an error the
publisher sees, never a silent drop."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
from kombu import Connection

from tests.rabbitmq import private_vhost, rabbitmqctl
from tests.stack import Stack

pytestmark = pytest.mark.integration

#: A RabbitMQ policy: the queue holds one message and refuses (nacks) any publish beyond it.
ONE_MESSAGE = json.dumps({"max-length": 1, "overflow": "reject-publish"})


def test_a_publish_the_broker_refuses_fails_loudly(
    make_stack: Callable[..., Stack], amqp_url: str, tmp_path: Path
) -> None:
    """A full queue (max-length, reject-publish) nacks the second batch: ``accumsync publish``
    exits 4 naming the broker and what to do, instead of reporting every event published."""
    with private_vhost(amqp_url) as (vhost, url):
        rabbitmqctl("set_policy", "-p", vhost, "one", ".*", ONE_MESSAGE, "--apply-to", "queues")
        stack = make_stack(broker_url=url)  # no worker: nothing drains the queue
        events = tmp_path / "events.jsonl"
        events.write_text("".join(json.dumps({"event_id": f"e{n}"}) + "\n" for n in range(3)))
        proc = stack.cli("publish", str(events), "--batch-size", "1", check=False)
        with Connection(url) as conn:
            waiting = conn.default_channel.queue_declare(stack.queue, passive=True).message_count
    assert waiting == 1
    assert proc.returncode == 4, proc.stdout + proc.stderr
    assert "published 3 events" not in proc.stdout
    assert "Traceback" not in proc.stderr
    assert "refused" in proc.stderr and "127.0.0.1:5672" in proc.stderr, proc.stderr
