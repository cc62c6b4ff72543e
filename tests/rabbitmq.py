"""RabbitMQ for the tests: a private vhost per test, and the faults ``rabbitmqctl`` injects.

A test's own vhost keeps its queues apart and lets it close only its own connections, so tests
(and people) using RabbitMQ beside it are not disturbed; ``stop_app`` is node-wide by nature.
"""

from __future__ import annotations

import os
import re
import subprocess
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any
from urllib.parse import quote, urlsplit

from kombu import Connection, Producer

from tests.services import RABBITMQ_STOPPED


def rabbitmqctl(*args: str, timeout: float = 60) -> str:
    """Run ``rabbitmqctl`` (through ``sudo -n`` unless root); its stdout, or AssertionError."""
    argv = ["rabbitmqctl", *args] if os.getuid() == 0 else ["sudo", "-n", "rabbitmqctl", *args]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"rabbitmqctl {' '.join(args)}: {proc.stdout}{proc.stderr}"
    return proc.stdout


@contextmanager
def private_vhost(amqp_url: str) -> Iterator[tuple[str, str]]:
    """A fresh vhost for guest: yields (vhost, its amqp:// URL); deleted afterwards."""
    vhost = f"t-{uuid.uuid4().hex[:10]}"
    rabbitmqctl("add_vhost", vhost)
    try:
        rabbitmqctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
        parts = urlsplit(amqp_url)
        yield vhost, f"{parts.scheme}://{parts.netloc}/{quote(vhost, safe='')}"
    finally:
        rabbitmqctl("delete_vhost", vhost)


def close_connections(vhost: str, why: str = "chaos") -> int:
    """Close every client connection to ``vhost`` (as an operator or a failover would);
    returns how many were closed."""
    out = rabbitmqctl("close_all_connections", "-p", vhost, why)
    closed = re.search(r"Closed (\d+) connection", out)
    assert closed, out
    return int(closed.group(1))


@contextmanager
def app_stopped() -> Iterator[None]:
    """``rabbitmqctl stop_app`` (the node stays up, its listeners close); ``start_app`` at the
    end, whatever happened inside."""
    RABBITMQ_STOPPED.touch()  # ensure_rabbitmq() elsewhere waits rather than starts it
    try:
        rabbitmqctl("stop_app", timeout=120)
        yield
    finally:
        try:
            rabbitmqctl("start_app", timeout=120)
        finally:
            RABBITMQ_STOPPED.unlink(missing_ok=True)


def publish_raw(
    url: str, queue: str, body: bytes, content_type: str, headers: dict[str, Any]
) -> None:
    """One message published as is (no serializer) to ``queue`` through the default exchange,
    confirmed by the broker: what a foreign producer's bug would send."""
    with Connection(url, transport_options={"confirm_publish": True}) as conn:
        Producer(conn.default_channel).publish(
            body,
            routing_key=queue,
            exchange="",
            content_type=content_type,
            content_encoding="utf-8",
            headers=headers,
            delivery_mode=2,
            serializer=None,
        )
