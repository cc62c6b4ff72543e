"""A batch's form in an ``accumsync.ingest`` message: one JSON text of the list of events.

Celery's JSON codec decodes a message body with an object hook per JSON object. The worker's
main process decodes each body (Celery's strategy reads the payload to tell the protocol), and
the Redis fetch encodes it once more into the unacked hash. As one string instead of hundreds
of objects, those passes cost the main process 15.6 us per event instead of 20.9; the pool
process gains nothing (it decodes the text itself). bench/README.md, finding 13.

``publish`` sends this form. The task also takes the list itself as ``args[0]``, the form a
producer in another language sends (docs/producers.md), and anything else as one item, which
validation dead-letters with its reason.
"""

from __future__ import annotations

import datetime as dt
import json
import uuid
from decimal import Decimal
from typing import Any


def encode(events: list[Any]) -> str:
    """The JSON text of ``events``: Python values the model takes as text (decimals, dates,
    timestamps, UUIDs) become their text, as a producer in another language sends them."""
    return json.dumps(events, separators=(",", ":"), default=_as_text)


def _as_text(value: Any) -> str:
    if isinstance(value, Decimal | uuid.UUID):
        return str(value)
    if isinstance(value, dt.date | dt.time):  # datetime is a date
        return value.isoformat()
    raise TypeError(f"an event holds a {type(value).__name__}, which JSON cannot carry")


def decode(arg: Any) -> list[Any]:
    """The raw events of an ingest message's ``args[0]``: a JSON text of the list parsed, a list
    as it is, anything else (one object, a text that is not JSON) as a batch of one item."""
    if isinstance(arg, str):
        try:
            arg = json.loads(arg)
        except ValueError:
            return [arg]  # validation names it: "event: invalid JSON (...)"
    return arg if isinstance(arg, list) else [arg]
