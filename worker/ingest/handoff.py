"""How an ``accumsync.ingest`` message goes from the worker's main process to its pool: decoded
once, not twice.

Celery's strategy decodes every message's body in the main process, only to tell the protocol
apart (``'args' in message.payload``), and then hands the pool the body's bytes, which the pool
decodes again; the task's arguments travel beside them as well, in the request's own fields. At
2,000 events a message that is a megabyte decoded twice and piped twice. :class:`IngestRequest`
hands the pool the payload already decoded instead (Celery's ``decoded`` form, which it uses for
protocol 1 messages): one copy piped (pickle sends an object named twice once), no second parse.

What reaches the task is the same value either way: the payload as kombu decoded it. A body that
cannot be decoded, or has the wrong shape, is refused in the main process as before, before any
request exists (worker/ingest/undeliverable.py).
"""

from __future__ import annotations

from typing import Any

from celery.worker.request import Request


class IngestRequest(Request):
    """A request whose pool receives the payload the main process decoded, not the body."""

    def __init__(self, message: Any, *args: Any, **kwargs: Any) -> None:
        if not kwargs.get("decoded"):
            # The strategy has read message.payload already; kombu keeps what it decoded.
            kwargs["body"], kwargs["decoded"] = message.payload, True
        super().__init__(message, *args, **kwargs)
