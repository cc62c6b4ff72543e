"""The ``accumsync.ingest`` message's one argument, in either of its two forms.

- **A list** of ClaimEvent objects: what any Celery client sends (docs/producers.md).
- **One JSON text of that list**: what :func:`worker.ingest.producer.publish` sends. To Celery
  it is a single string, so the worker's main process and its pool handle one value per message
  instead of every field of every event: they decode the whole body to read a protocol key,
  re-encode it for the broker's unacked record, and pipe it to the pool, where it is decoded
  again. The pool then parses the text once, in :func:`events_of`.

The text is written and read by kombu's own JSON codec, the one the list form goes through, so
the two forms decide nothing differently: a Python producer's ``Decimal`` or ``date`` arrives
as the same object either way (tests/unit/test_message.py). A text that is not JSON is
dead-lettered whole, as one invalid item with the parser's reason.
"""

from __future__ import annotations

from typing import Any

from kombu.utils.json import dumps, loads


def text_of(batch: list[Any]) -> str:
    """The text form of a batch of raw events."""
    return str(dumps(batch))


def events_of(argument: Any) -> list[Any]:
    """The raw items a message carries: its list, the list its text holds, or else the argument
    (or the text that is not JSON) as one item, which validation refuses with its reason."""
    if isinstance(argument, str):
        try:
            argument = loads(argument)
        except ValueError:
            return [argument]  # validation: "event: invalid JSON (...)"
    return argument if isinstance(argument, list) else [argument]
