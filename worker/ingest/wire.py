"""A batch's form in an ``accumsync.ingest`` message: one JSON text of the list of events.

Celery's JSON codec decodes a message body with an object hook per JSON object. The worker's
main process decodes each body (Celery's strategy reads the payload to tell the protocol apart)
and pipes the decoded payload to its pool (worker/ingest/handoff.py). As one string instead of
thousands of objects, that decoding and piping cost a fraction; the pool parses the text itself,
once (bench/README.md, finding 13: 15.6 against 20.9 us per event in the main process then).

``publish`` sends this form. The task also takes the list itself as ``args[0]``, the form a
producer in another language sends (docs/producers.md), and anything else as one item, which
validation dead-letters with its reason.
"""

from __future__ import annotations

import json
from typing import Any

from pydantic_core import PydanticSerializationError, to_json


def encode(events: list[Any]) -> str:
    """The JSON text of ``events``: Python values the model takes as text (decimals, dates,
    timestamps, UUIDs) become their text, as a producer in another language sends them.

    pydantic-core writes it, in half the time of ``json``'s encoder (1.8 against 3.8 us an
    event, a producer's main cost). A value JSON cannot carry raises ``TypeError`` naming it, as
    ``json`` would; a set or a tuple travels as a list, which validation then judges."""
    try:
        return to_json(events, fallback=_refuse).decode()
    except PydanticSerializationError as exc:
        raise TypeError(str(exc).removeprefix(_REFUSED)) from None


_REFUSED = "Error serializing to JSON: TypeError: "


def _refuse(value: Any) -> str:
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
