"""Messages the broker delivers but no task can run: a body that is not JSON, a foreign content
type, an unknown ``accumsync.*`` task, a malformed task message, arguments of the wrong shape.

Celery's own handling logs such a message (its body included: member data in the logs) and drops
it. Here each becomes a dead letter (source ``broker``) with its reason, size, sha256 and a
truncated copy of the body, visible in ``accumsync dead-letters list``; the log line carries the
kind, size and hash only; the worker goes on. A producer's bug then leaves a trace an operator can
act on: fix the producer, publish the events again.

Celery uses :class:`Consumer` through the ``worker_consumer`` setting (worker/celery.py names it
by string: the app does not import this room).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from typing import Any

from celery.worker.consumer import Consumer as CeleryConsumer
from kombu.exceptions import ContentDisallowed

from worker.db import session_scope, utcnow
from worker.logs import Log
from worker.store.dead_letters import dead_letter

log = Log("broker")
logger = logging.getLogger("accumsync.broker")
BODY_KEPT = 4096  # characters of a refused message's body kept in its dead letter
SOURCE = "broker"


def undeliverable(body: Any, kind: str, reason: str, task: str | None = None) -> None:
    """Record a message no task can run, as a dead letter; never log its body."""
    raw = body if isinstance(body, bytes) else _encoded(body)
    digest = hashlib.sha256(raw).hexdigest()
    text = raw.decode("utf-8", "replace")
    payload = {
        "kind": kind,
        "task": task,
        "size": len(raw),
        "sha256": digest,
        "body": text[:BODY_KEPT],
        "truncated": len(text) > BODY_KEPT,
    }
    with session_scope() as session:
        dead_letter(session, SOURCE, payload, reason, utcnow(), kind=kind)
    log.error("broker.undeliverable", kind=kind, task=task, size=len(raw), sha256=digest)


def _encoded(body: Any) -> bytes:
    try:
        return json.dumps(body, sort_keys=True, default=repr).encode()
    except (TypeError, ValueError):
        return repr(body).encode()


class Consumer(CeleryConsumer):
    """Celery's consumer, with each undeliverable message dead-lettered instead of logged."""

    @property
    def _connection_errors(self) -> tuple[type[BaseException], ...]:
        errors: tuple[type[BaseException], ...] = getattr(self, "connection_errors", ())
        return errors

    def _keep(self, message: Any, body: Any, kind: str, reason: str) -> bool:
        """Dead-letter it; False (the message goes back to the broker) when the letter can't be
        written, whatever the cause (the store is down, most often): it is retried rather than
        lost, and no exception reaches Celery's consumer loop, whose death would stop the worker
        consuming anything."""
        task = _header(message, "task")
        try:
            undeliverable(message.body if body is None else body, kind, reason, task)
        except Exception as exc:  # any failure: keep the message, keep consuming
            error = type(getattr(exc, "orig", None) or exc).__name__
            log.warning("broker.undeliverable_not_recorded", kind=kind, error=error)
            time.sleep(1)  # don't spin on the message while the cause lasts
            message.reject(requeue=True)
            return False
        return True

    def on_decode_error(self, message: Any, exc: Exception) -> None:
        codec = _header(message, "compression")
        why = (
            f"the body can't be decoded ({type(exc).__name__}): content type "
            f"{message.content_type!r}, encoding {message.content_encoding!r}"
            + (f", compression {codec!r}" if codec else "")
            + "; accumsync takes JSON task messages (application/json, utf-8), compressed or"
            " not (a codec kombu knows: application/zstd, application/x-gzip)"
        )
        if self._keep(message, message.body, "undecodable", why):
            message.ack()

    def on_unknown_message(self, body: Any, message: Any) -> None:
        why = "not a Celery task message (no task header): publish with a Celery client"
        if self._keep(message, message.body, "not_a_task", why):
            message.reject_log_error(logger, self._connection_errors)

    def on_unknown_task(self, body: Any, message: Any, exc: Exception) -> None:
        name = _header(message, "task")
        why = f"no task named {name!r}: accumsync runs accumsync.ingest (see docs/producers.md)"
        if self._keep(message, message.body, "unknown_task", why):
            message.reject_log_error(logger, self._connection_errors)

    def on_invalid_task(self, body: Any, message: Any, exc: Exception) -> None:
        if isinstance(exc, ContentDisallowed):
            why = (
                f"content type {message.content_type!r} is not accepted: accumsync takes "
                "JSON task messages (application/json)"
            )
        else:
            why = f"an invalid task message ({type(exc).__name__}): headers or body malformed"
        if self._keep(message, message.body, "invalid_task", why):
            message.reject_log_error(logger, self._connection_errors)


def _header(message: Any, name: str) -> str | None:
    headers = getattr(message, "headers", None) or {}
    value = headers.get(name) if isinstance(headers, dict) else None
    return value if isinstance(value, str) else None
