"""The ingest message's two forms decide nothing: for any batch a producer may hold, the text
form (worker/ingest/message.py) validates to the same events, content hashes and refusal
reasons as the list form through kombu's JSON, which is what every batch went through before.
(A plain JSON codec would not: it writes a Decimal event_id as a string, which the strict id
field then takes, where the list form refused it.)"""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta, timezone
from decimal import Decimal
from typing import Any

from hypothesis import given
from hypothesis import strategies as st
from kombu.utils.json import dumps, loads

from worker.ingest.message import events_of, text_of
from worker.ingest.store import validate

BASE: dict[str, Any] = {
    "event_id": "e-1",
    "claim_id": "c-1",
    "version": 3,
    "status": "adjudicated",
    "subscriber_id": "S0000001",
    "group_id": "GRP001",
    "plan_year": "2026",
    "plan_type": "MED",
    "benefit_code": "DED",
    "network": "in",
    "service_date": "2026-03-02",
    "adjudicated_at": "2026-03-03T10:00:00+00:00",
    "amounts": {"copay": "25.00", "deductible": 100},
}

amounts = st.one_of(
    st.decimals(min_value=-5, max_value=10**13, places=2, allow_nan=False),
    st.decimals(allow_nan=True, allow_infinity=True),
    st.floats(allow_nan=True, allow_infinity=True),
    st.integers(min_value=-(10**14), max_value=10**14),
    st.sampled_from(["12.34", "1e2", "-0", "1.005", " 5", "abc", True, None]),
)
texts = st.one_of(st.text(max_size=12), st.sampled_from(["é", "名前", "a\x00b", "\ud800", "ok"]))
dates = st.one_of(
    st.dates(),
    st.datetimes(timezones=st.sampled_from([UTC, timezone(timedelta(hours=-5))])),
    st.datetimes(),  # naive: refused as adjudicated_at
    st.times(),
)
values = st.one_of(amounts, texts, dates, st.integers(), st.lists(st.integers(), max_size=2))


@st.composite
def events(draw: st.DrawFn) -> Any:
    """A valid event with a few fields changed (to any kind of value), added or removed; or
    something that is not an object at all."""
    if draw(st.integers(0, 9)) == 0:  # JSON's own: a refusal names the item's type
        return draw(st.one_of(texts, st.integers(), st.none(), st.lists(st.integers())))
    event = dict(BASE, event_id=draw(st.text(min_size=1, max_size=8)))
    event["amounts"] = dict(BASE["amounts"])
    for _ in range(draw(st.integers(0, 3))):
        field = draw(st.sampled_from([*BASE, "amounts.copay", "amounts.cob", "surplus"]))
        if draw(st.booleans()) and field != "surplus":
            event.pop(field, None)
            continue
        value = draw(amounts if field.startswith("amounts") else values)
        if field.startswith("amounts."):
            if not isinstance(event.get("amounts"), dict):
                event["amounts"] = {}
            event["amounts"][field.split(".")[1]] = value
        else:
            event[field] = value
    return event


def outcome(raw: list[Any]) -> tuple[list[Any], list[str]]:
    good, bad = validate(raw)
    return [(event, digest) for event, digest, _ in good], [reason for _, reason in bad]


@given(st.lists(events(), max_size=6))
def test_the_text_form_validates_as_the_list_form_did(batch: list[Any]) -> None:
    try:
        through_kombu = loads(dumps(batch))
    except (TypeError, ValueError):
        return  # a value kombu's JSON cannot carry either: no message then, nor now
    try:
        text = text_of(batch)
    except (TypeError, ValueError) as exc:
        raise AssertionError(f"the text form refused what kombu carried: {exc}") from None
    assert outcome(events_of(text)) == outcome(through_kombu)


def test_python_values_in_the_text_form() -> None:
    """Decimal amounts and date/datetime values arrive as their strings, and validate alike."""
    held = dict(BASE, service_date=date(2026, 3, 2))
    held["adjudicated_at"] = datetime(2026, 3, 3, 10, tzinfo=UTC)
    held["amounts"] = {"copay": Decimal("25.00"), "deductible": Decimal(100)}
    assert outcome(events_of(text_of([held]))) == outcome([BASE])


def test_what_is_not_a_list() -> None:
    """A text that is not JSON, or one object, is one item; validation says what is wrong."""
    assert outcome(events_of('[{"event_id": "e-1", '))[1][0].startswith("event: invalid JSON")
    assert events_of(text_of(BASE)) == [BASE] == events_of(BASE)  # type: ignore[arg-type]
    assert events_of(None) == [None]
