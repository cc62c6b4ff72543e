"""A batch's form in an ``accumsync.ingest`` message: one JSON text of the list of events.

Celery's JSON codec decodes a message body with an object hook per JSON object. The worker's
main process decodes each body (Celery's strategy reads the payload to tell the protocol apart)
and pipes the decoded payload to its pool (worker/ingest/handoff.py). As one string instead of
thousands of objects, that decoding and piping cost a fraction (bench/README.md, finding 13:
15.6 against 20.9 us per event in the main process then).

``publish`` sends this form. The task also takes the list itself as ``args[0]``, the form a
producer in another language sends (docs/producers.md), and anything else as one item, which
validation dead-letters with its reason.

The pool does not parse the text into objects either, unless it must (:class:`Text`):
validation reads the text itself, in one call into pydantic-core (bench/README.md, finding 22).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any, overload

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


def batch(arg: Any) -> Sequence[Any]:
    """An ingest message's ``args[0]`` as its batch of raw events: a JSON text kept as it is
    (:class:`Text`), anything else as :func:`decode` makes it."""
    return Text(arg) if isinstance(arg, str) else decode(arg)


class Text(Sequence[Any]):
    """A batch as the JSON text ``publish`` sent, parsed into its items only when one is asked
    for.

    Validation reads the text itself, in one call into pydantic-core, as the model's JSON
    (worker/ingest/store.py, ``validate``): 2-3 us an event less than ``json.loads`` and then
    validating its objects. A batch that validates whole is never parsed here. The items, as
    :func:`decode` makes them, are for what needs an item as it was sent: a batch with an
    invalid item (each one then validated alone), a conflict's dead letter, a batch the store
    refuses (halved), a retry's description."""

    def __init__(self, text: str) -> None:
        self.text = text
        self._items: list[Any] | None = None

    @property
    def parsed(self) -> bool:
        """Whether the items were asked for already."""
        return self._items is not None

    @property
    def items(self) -> list[Any]:
        if self._items is None:
            self._items = decode(self.text)
        return self._items

    def __len__(self) -> int:
        return len(self.items)

    @overload
    def __getitem__(self, index: int) -> Any: ...

    @overload
    def __getitem__(self, index: slice) -> list[Any]: ...

    def __getitem__(self, index: int | slice) -> Any:
        return self.items[index]
