"""The batch's validation: one call for a whole batch, item by item once an item is invalid.
Either way every item gets what it would get alone."""

from __future__ import annotations

import datetime as dt
import json
import uuid
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from sqlmodel import select

from models.tables import DeadLetter
from tests.unit.test_events import BASE, raw_event
from worker import db
from worker.db import utcnow
from worker.ingest import wire
from worker.ingest.store import ingest, validate
from worker.ops.replay import replay
from worker.store.dead_letters import dead_letter

INVALID: list[Any] = [
    {**BASE, "version": -1},
    {**BASE, "amounts": {"copay": "1.005"}},
    {**BASE, "subscriber_id": "CAFÉ"},
    {**BASE, "surprise": 1},
    "not an object",
    '{"half": ',
    None,
]


def item(i: int, bad: int | None) -> Any:
    return INVALID[bad] if bad is not None else {**BASE, "event_id": f"e-{i}", "claim_id": f"c{i}"}


@given(st.lists(st.one_of(st.none(), st.integers(0, len(INVALID) - 1)), max_size=30))
def test_a_batch_validates_as_its_items_alone(plan: list[int | None]) -> None:
    batch = [item(i, bad) for i, bad in enumerate(plan)]
    good, bad = validate(batch)
    alone = [validate([x]) for x in batch]
    assert [(e.event_id, h) for e, h, _ in good] == [
        (e.event_id, h) for g, _ in alone for e, h, _ in g
    ]
    valid_alone = [id(x) for x, (g, _) in zip(batch, alone, strict=True) for _ in g]
    assert [id(batch[i]) for _, _, i in good] == valid_alone
    assert bad == [r for _, b in alone for r in b]
    assert len(good) + len(bad) == len(batch)


@given(st.lists(st.one_of(st.none(), st.integers(0, len(INVALID) - 1)), max_size=30))
def test_a_batch_sent_as_json_text_validates_as_the_list(plan: list[int | None]) -> None:
    """``publish``'s form (one JSON text of the list) gives every item what the list gives it:
    the same events, content hashes, positions and reasons, whether the text is validated as
    it is (the task's form) or parsed first."""
    batch = [item(i, bad) for i, bad in enumerate(plan)]
    good, bad = validate(batch)
    text = wire.encode(batch)
    for received in (wire.batch(text), wire.decode(text)):
        assert validate(received) == (good, bad)


@given(st.lists(raw_event(), max_size=5))
def test_any_valid_text_validates_as_its_parsed_items(batch: list[dict[str, Any]]) -> None:
    """pydantic-core validating the JSON text as it is gives what ``json`` parsing it and the
    model validating its objects give, for any valid events: amounts as JSON numbers (floats
    included) or strings, any text the contract allows, any date and offset. The text is never
    parsed when it validates whole."""
    text = json.dumps(batch, default=str)
    received = wire.batch(text)
    assert validate(received) == validate(json.loads(text))
    assert isinstance(received, wire.Text) and not received.parsed


def test_python_values_travel_as_the_text_a_foreign_producer_sends() -> None:
    """Decimals, dates, timestamps and UUIDs (Celery's codec would tag them as Python objects)
    become their text, which the model takes; a value JSON cannot carry is named."""
    event = {
        **BASE,
        "event_id": uuid.UUID(int=7),
        "service_date": dt.date(2026, 3, 2),
        "adjudicated_at": dt.datetime(2026, 3, 2, 9, 30, tzinfo=dt.UTC),
        "amounts": {"copay": Decimal("10.50")},
    }
    (decoded,) = wire.decode(wire.encode([event]))
    assert decoded["event_id"] == "00000000-0000-0000-0000-000000000007"
    assert (decoded["service_date"], decoded["adjudicated_at"]) == (
        "2026-03-02",
        "2026-03-02T09:30:00Z",
    )
    assert decoded["amounts"] == {"copay": "10.50"}
    assert (
        validate([decoded])[0][0][1]
        == validate([event | {"event_id": str(event["event_id"])}])[0][0][1]
    )
    with pytest.raises(TypeError, match="an event holds a object, which JSON cannot carry"):
        wire.encode([{**BASE, "amounts": {"copay": object()}}])
    # A set travels as a list (JSON has no sets): validation then names what is wrong.
    (as_list,) = wire.decode(wire.encode([{**BASE, "amounts": {1}}]))
    assert validate([as_list])[1][0][1].startswith("amounts: Input should be"), validate([as_list])


@pytest.mark.parametrize(
    ("arg", "batch"),
    [
        ('[{"a": 1}, 2]', [{"a": 1}, 2]),  # the text of a list: its items
        ([{"a": 1}], [{"a": 1}]),  # a list: as it is
        ('{"a": 1}', [{"a": 1}]),  # the text of one object: one item
        ({"a": 1}, [{"a": 1}]),  # one object: one item
        ("{not json", ["{not json"]),  # not JSON: one item, refused as invalid JSON
        (None, [None]),
    ],
)
def test_any_first_argument_is_a_batch(arg: Any, batch: list[Any]) -> None:
    assert wire.decode(arg) == batch
    assert list(wire.batch(arg)) == batch


def test_a_conflict_in_a_text_batch_is_dead_lettered_as_it_was_sent(store: str) -> None:
    """A batch validated from its text whole still dead-letters a conflict as the item that
    was sent (the text is parsed for it), with the rest of the batch recorded."""
    first = item(0, None)
    other = {**first, "event_id": "e-other", "amounts": {"copay": "1.50"}}  # same version
    batch = [first, item(1, None), other]
    text = wire.encode(batch)
    with db.session_scope() as session:
        counts = ingest(session, wire.batch(text))
    assert (counts.received, counts.conflict, counts.applied) == (3, 1, 2)
    with db.session_scope() as session:
        (letter,) = session.exec(select(DeadLetter)).all()
    assert json.loads(letter.payload) == wire.decode(text)[2]
    assert letter.reason == "claim_id+version: version 0 already received with different content"


def test_a_text_batch_an_earlier_worker_refused_replays_as_its_events(store: str) -> None:
    """A worker of a release before the JSON-text messages refuses a whole text batch as one
    item ("must be a JSON object, got str"); once the workers are upgraded, ``dead-letters
    replay`` publishes its events, one by one, not the text again."""
    batch = [item(i, None) for i in range(3)]
    with db.session_scope() as session:
        dead_letter(session, "ingest", wire.encode(batch), "event: must be a JSON object", utcnow())
    with db.session_scope() as session:
        assert replay(session).events == batch
