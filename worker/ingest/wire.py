"""A batch's form in an ``accumsync.ingest`` message: one JSON text of the list of events.

Celery's JSON codec decodes a message body with an object hook per JSON object, and the worker
decodes each body twice (its main process reads the body to tell the protocol, then the pool
process reads it again) and encodes it once more (Redis keeps the taken message): for a list of
thousands of event objects that was about 29 us of Python per event. The same list as one JSON
text is a single string to the codec, so those passes cost about 1 us, and the task parses the
text once, without a hook (bench/README.md, finding 13).

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
