"""An ingest message from the worker's main process to its pool: decoded once, sent once."""

from __future__ import annotations

import pickle
from typing import Any

from celery.worker.request import Request
from kombu import compression
from kombu.message import Message
from kombu.serialization import dumps, prepare_accept_content
from kombu.utils.imports import symbol_by_name

import tasks.ingest  # noqa: F401  # registers accumsync.ingest
from tests.unit.test_events import BASE
from worker.celery import app
from worker.ingest import wire
from worker.ingest.producer import COMPRESSION


def received(args: list[Any]) -> Message:
    """The message a worker takes off the broker after ``publish`` sent ``args``: Celery's
    protocol 2, JSON, compressed as the producer compresses it."""
    headers, properties, body, _ = app.amqp.as_task_v2("t-1", "accumsync.ingest", args=args)
    content_type, encoding, data = dumps(body, serializer="json")
    packed, codec = compression.compress(data, COMPRESSION)
    return Message(
        body=packed,
        content_type=content_type,
        content_encoding=encoding,
        headers=headers | {"compression": codec},
        properties=properties,
        delivery_info={"exchange": "", "routing_key": "q"},
        accept=prepare_accept_content(["json"]),
    )


def handed_over(kind: type[Request], message: Message) -> tuple[Any, ...]:
    """What the main process pipes to the pool for ``message``: Celery's strategy decodes the
    payload (to tell the protocol), makes the request, and the request sends these fields."""
    assert "args" not in message.payload  # protocol 2, as the strategy finds it
    request = kind(
        message, app=app, body=message.body, headers=message.headers, decoded=False, utc=True
    )
    return (request.request_dict, request.body, request.content_type, request.content_encoding)


def test_the_pool_gets_the_decoded_payload_once() -> None:
    """The pool receives the arguments the main process decoded, in one copy; it has nothing
    to decode. Celery's own request sends the body's bytes to decode again beside the decoded
    arguments: two copies of a megabyte at 2,000 events a message."""
    batch = [{**BASE, "event_id": f"e-{i}", "claim_id": f"c-{i}"} for i in range(500)]
    text = wire.encode(batch)
    ingests = symbol_by_name(app.tasks["accumsync.ingest"].Request)
    request_dict, body, content_type, content_encoding = handed_over(ingests, received([text]))
    assert (content_type, content_encoding) == (None, None)
    args, kwargs, _embed = body  # as the pool's trace unpacks a decoded body
    assert (wire.decode(args[0]), kwargs) == (batch, {})
    piped = len(pickle.dumps((request_dict, body), protocol=pickle.HIGHEST_PROTOCOL))
    assert piped < 1.1 * len(text), (piped, len(text))

    celerys = handed_over(Request, received([text]))
    assert celerys[2] == "application/json"  # the pool would decode the body again
    assert len(pickle.dumps(celerys[:2], protocol=pickle.HIGHEST_PROTOCOL)) > 1.9 * len(text)
