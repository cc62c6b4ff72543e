"""schemas/claim_event.v1.json: current with the model, and never looser than it.

A producer in another language validates against the file before it publishes; an event the
schema passes must be one the worker applies. Two gaps, both said in the schema's descriptions:
JSON Schema cannot count a JSON number's decimals (``12.345`` as a number passes it), and it
takes ``1.0`` as an integer (the worker wants ``version`` written without a fraction).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jsonschema
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from models.events import ClaimEvent, json_schema
from worker.demo.streams import StreamSpec, generate

FILE = Path(__file__).parents[2] / "schemas" / "claim_event.v1.json"
VALIDATOR = jsonschema.Draft202012Validator(
    json_schema(), format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER
)


def test_the_file_is_the_model_s_schema() -> None:
    on_disk = json.loads(FILE.read_text(encoding="utf-8"))
    assert on_disk == json_schema(), "stale: run `accumsync schema > schemas/claim_event.v1.json`"


def test_the_schema_is_valid_draft_2020_12() -> None:
    jsonschema.Draft202012Validator.check_schema(json_schema())


def test_every_event_of_the_demo_stream_passes() -> None:
    events = generate(StreamSpec(events=2_000, members=50, seed=7))
    failures = [e for e in events if isinstance(e, dict) and not VALIDATOR.is_valid(e)]
    assert failures == []


def test_the_schema_names_the_field_and_the_rule() -> None:
    event = {**_valid(), "amounts": {"copay": "12.345"}}
    (error,) = VALIDATOR.iter_errors(event)
    assert list(error.absolute_path) == ["amounts", "copay"]


def _valid() -> dict[str, Any]:
    return {
        "event_id": "e-1",
        "claim_id": "c-1",
        "version": 0,
        "status": "adjudicated",
        "subscriber_id": "S0000001",
        "group_id": "GRP001",
        "plan_year": "2026",
        "plan_type": "MED",
        "benefit_code": "DED",
        "network": "in",
        "amounts": {"copay": "25.00", "deductible": 100},
    }


TEXT = st.one_of(
    st.text(max_size=24),
    st.sampled_from(["", " ", "   ", "DED ", "ded", "a\x00b", "x\x7f", "\t", "S" * 9, "S" * 10]),
)
AMOUNT = st.one_of(
    st.from_regex(r"-?[0-9]{0,13}(\.[0-9]{0,3})?", fullmatch=True),
    st.integers(min_value=-5, max_value=10**13),
    st.sampled_from(["1e2", "+5", " 5", "NaN", "Infinity", "0.10", "999999999999.99"]),
    st.booleans(),
    st.none(),
)
VALUE = {
    "event_id": TEXT,
    "claim_id": TEXT,
    "version": st.one_of(st.integers(-2, 2**31 + 1), st.sampled_from(["1", True, None])),
    "status": st.sampled_from(["adjudicated", "reversed", "ADJUDICATED", "void", 1]),
    "subscriber_id": TEXT,
    "group_id": TEXT,
    "plan_year": TEXT,
    "plan_type": TEXT,
    "benefit_code": TEXT,
    "network": st.sampled_from(["in", "out", "IN", "", None]),
    "member_seq": st.one_of(st.none(), TEXT),
    "service_date": st.sampled_from([None, "2026-03-01", "2026-02-30", "03/01/2026", 20260301]),
    "amounts": st.dictionaries(
        st.sampled_from(["copay", "deductible", "out_of_pocket", "allowed", "copays"]), AMOUNT
    ),
}


@st.composite
def events(draw: st.DrawFn) -> dict[str, Any]:
    """A valid event with one to three fields changed (to a value that may be valid or not, or
    absent), sometimes an extra field: each rule is met alone, not hidden behind another."""
    event = _valid()
    for name in draw(st.lists(st.sampled_from(sorted(VALUE)), min_size=1, max_size=3)):
        if draw(st.integers(0, 5)) == 0:
            event.pop(name, None)
        else:
            event[name] = draw(VALUE[name])
    if draw(st.integers(0, 9)) == 0:
        event["extra"] = "x"
    return event


@settings(max_examples=1500, deadline=None)
@given(events())
def test_what_the_schema_passes_the_worker_applies(event: dict[str, Any]) -> None:
    applies_if_schema_passes(event)


@settings(max_examples=500, deadline=None)
@given(st.dictionaries(st.sampled_from(["copay", "deductible", "billed"]), AMOUNT, max_size=2))
def test_amounts_the_schema_passes_the_worker_applies(amounts: dict[str, Any]) -> None:
    applies_if_schema_passes({**_valid(), "amounts": amounts})


def applies_if_schema_passes(event: dict[str, Any]) -> None:
    if not VALIDATOR.is_valid(event):
        return
    try:
        ClaimEvent.model_validate(event)
    except ValidationError as exc:
        raise AssertionError(f"schema passed, worker refused: {exc}") from None
