"""The wire models against the seed documents, field by field, and their money rules."""

from __future__ import annotations

import re
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from annotated_types import MaxLen, MinLen
from pydantic import ValidationError

from models.buckets import VBA_FIELDS
from models.vba import (
    PLAN_LIMIT_FIELDS,
    BatchItemWire,
    Debug,
    Envelope,
    PlanAccumulator,
    ProblemDetails,
    SubscriberAccum,
    dumps,
    loads,
)
from tests.unit.vba_fake import record

SEEDS = Path(__file__).resolve().parents[2].parent / "shared" / "seeds"
SEED_PLAN = SEEDS / "000_e4c3730f34f81248.txt"
SEED_SUBSCRIBER = SEEDS / "002_ab36b17533dd3d4d.txt"
NOT_NULL = "NOT NULL in the database"


def subscriber_seed() -> dict[str, dict[str, Any]]:
    """Seed 002's body fields: name -> required, length bounds, NOT NULL, nullable."""
    lines = [line.strip() for line in SEED_SUBSCRIBER.read_text().splitlines()]
    fields: dict[str, dict[str, Any]] = {}
    for i, name in enumerate(lines[:-3]):
        if not re.fullmatch(r"[a-z][A-Za-z]*_[A-Za-z_]+", name):
            continue
        required = lines[i + 1] == "required"
        kind = lines[i + 2] if required else lines[i + 1]
        if not re.match(r"(string|number|integer)", kind):
            continue
        bounds = re.search(r"\[ (\d+) \.\. (\d+) \]", kind)
        at_most = re.search(r"<= (\d+) characters", kind)
        fields.setdefault(
            name,
            {
                "required": required,
                "min": int(bounds[1]) if bounds else None,
                "max": int(bounds[2]) if bounds else (int(at_most[1]) if at_most else None),
                "not_null": NOT_NULL in lines[i + 4] if required else False,
                "nullable": "or null" in kind,
            },
        )
    return fields


def plan_seed() -> tuple[dict[str, str], dict[str, str]]:
    """Seed 000's request fields and 207 response fields: name -> type text."""
    body = SEED_PLAN.read_text().split("## Request fields", 1)[1]
    request, response = body.split("## Response 207", 1)
    pattern = r"- `([\w.]+)` \(([^)]*)\)"
    return dict(re.findall(pattern, request)), dict(re.findall(pattern, response))


def bounds(model: Any, name: str) -> tuple[int | None, int | None]:
    """A model field's (min_length, max_length)."""
    meta = model.model_fields[name].metadata
    low = next((m.min_length for m in meta if isinstance(m, MinLen)), None)
    high = next((m.max_length for m in meta if isinstance(m, MaxLen)), None)
    return low, high


def test_seed_files_are_found() -> None:
    """The seeds beside the repository are readable (the other tests depend on them)."""
    assert SEED_PLAN.is_file()
    assert SEED_SUBSCRIBER.is_file()
    assert len(subscriber_seed()) == 40


def test_subscriber_fields_match_seed_both_ways() -> None:
    """Every seed 002 field is a SubscriberAccum field and vice versa, spelled alike."""
    assert set(subscriber_seed()) == set(SubscriberAccum.model_fields)


def test_not_null_amounts_are_the_bucket_table() -> None:
    """Seed 002's NOT NULL amounts are exactly models.buckets.VBA_FIELDS."""
    not_null = {n for n, f in subscriber_seed().items() if f["not_null"]}
    assert not_null == set(VBA_FIELDS)
    assert len(VBA_FIELDS) == 30


def test_subscriber_required_fields_match_seed() -> None:
    """A field is required in the model exactly when seed 002 says so."""
    required = {n for n, f in subscriber_seed().items() if f["required"]}
    model_required = {n for n, f in SubscriberAccum.model_fields.items() if f.is_required()}
    assert required == model_required


def test_subscriber_lengths_match_seed() -> None:
    """String length bounds follow seed 002 ([1 .. 9], <= 20, ...)."""
    for name, spec in subscriber_seed().items():
        if spec["max"] is not None:
            low, high = bounds(SubscriberAccum, name)
            assert (low or 0, high) == (spec["min"] or 0, spec["max"]), name


def test_plan_fields_match_seed_both_ways() -> None:
    """Every seed 000 request field is a PlanAccumulator field and vice versa."""
    request, _ = plan_seed()
    assert set(request) == set(PlanAccumulator.model_fields)
    numbers = {n for n, kind in request.items() if kind.startswith("number")}
    assert numbers == set(PLAN_LIMIT_FIELDS)


def test_plan_required_and_nullable_match_seed() -> None:
    """plan_ID and accum_Name are required; the nullable limits default to None."""
    request, _ = plan_seed()
    required = {n for n, kind in request.items() if "required" in kind}
    model_required = {n for n, f in PlanAccumulator.model_fields.items() if f.is_required()}
    assert required == model_required == {"plan_ID", "accum_Name"}
    plan = PlanAccumulator.model_validate({"plan_ID": "P", "accum_Name": "A"})
    assert all(getattr(plan, n) is None for n in PLAN_LIMIT_FIELDS)


def test_207_response_fields_match_seed() -> None:
    """Seed 000's 207 fields exist in BatchItemWire, ProblemDetails and Debug."""
    _, response = plan_seed()
    for name in response:
        head, _, tail = name.partition(".")
        if head == "data" and tail:
            assert tail.split(".")[0] in BatchItemWire.model_fields or tail in (
                "id.key",
                "id.value",
            )
        elif head == "error" and tail:
            assert tail in ProblemDetails.model_fields
        elif head == "debug" and tail:
            assert Debug.model_validate({tail: "x"}).activityId == "x"


def test_envelope_accepts_both_activity_id_spellings() -> None:
    """debug.activityId (seed 002) and debug.activityID (seed 000) both parse."""
    for key in ("activityId", "activityID"):
        assert Envelope.model_validate({"debug": {key: "a1"}}).activity_id == "a1"


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("subscriber_ID", "1234567890"),
        ("subscriber_ID", ""),
        ("group_ID", "G" * 21),
        ("plan_Year", "123456789"),
        ("plan_Type", "1234567"),
        ("benefit_Code", "12345678901"),
        ("added_Accum", "YY"),
        ("entry_User", "u" * 21),
        ("allowed_Amt", None),
        ("copay_Amt", "1.234"),
        ("coins_Amt", "NaN"),
        ("coB_Amt", "Infinity"),
    ],
)
def test_seed_rules_are_enforced(field: str, value: object) -> None:
    """Lengths, NOT NULL amounts and cents are checked before anything is sent."""
    with pytest.raises(ValidationError):
        SubscriberAccum.model_validate(record(**{field: value}))


def test_unknown_field_is_refused_when_building() -> None:
    """A misspelt field (copay_amt) is refused instead of silently dropped."""
    with pytest.raises(ValidationError):
        SubscriberAccum.model_validate(record(copay_amt=Decimal(1)))


def test_from_vba_drops_unknown_fields_and_rounds_doubles() -> None:
    """What VBA sends is parsed leniently: extra fields ignored, doubles rounded to cents."""
    row = SubscriberAccum.from_vba(record(allowed_Amt=loads("12.345000001"), extra=1))
    assert row.allowed_Amt == Decimal("12.35")


def test_dumps_writes_two_decimal_numbers() -> None:
    """Amounts go out as JSON numbers with exactly two decimals."""
    text = dumps(SubscriberAccum.model_validate(record(allowed_Amt="7")).to_wire())
    assert '"allowed_Amt":7.00' in text
    assert '"added_Accum":null' in text


def test_wire_round_trip_is_exact() -> None:
    """dumps then loads gives back the same Decimal amounts, to the cent."""
    row = SubscriberAccum.model_validate(record(copay_Amt=Decimal("123456789.99")))
    back = SubscriberAccum.model_validate(loads(dumps(row.to_wire())))
    assert back == row
    assert back.amounts()["copay_Amt"] == Decimal("123456789.99")


def test_batch_item_key_as_text() -> None:
    """A 207 item's key is a dict of text values, numbers included."""
    item = BatchItemWire.model_validate(
        {
            "id": [{"key": "plan_ID", "value": 7}, {"key": "accum_Name", "value": "RX"}],
            "status": 200,
        }
    )
    assert item.key() == {"plan_ID": "7", "accum_Name": "RX"}


KEYS = {
    "subscriber_ID": "123456789",
    "group_ID": "GRP1",
    "plan_Year": "2026",
    "plan_Type": "MED",
    "benefit_Code": "DED",
}


def test_a_request_carries_no_null_the_seed_does_not_allow() -> None:
    """What we send holds only the fields set: no `entry_Date: null` (a .NET model binder
    refuses the whole request for it), and null only where the seed says "or null"."""
    from models.vba import PlanAccumulator, SubscriberAccum

    row = SubscriberAccum.model_validate(
        {**{f: Decimal(1) for f in VBA_FIELDS}, **KEYS, "added_Accum": None}
    )
    body = row.to_request()
    assert "entry_Date" not in body and "update_Date" not in body and "entry_User" not in body
    assert body["added_Accum"] is None  # set to null on purpose, and nullable
    plan = PlanAccumulator.model_validate({"plan_ID": "P", "accum_Name": "A", "annual_Max": None})
    assert plan.to_request() == {"plan_ID": "P", "accum_Name": "A", "annual_Max": None}


def test_listed_rows_are_read_leniently() -> None:
    """A listed row with a null amount, a long user and an unknown field is read; an amount
    that is not a number is refused, naming the field; sub-cent amounts are kept and named."""
    from models.vba import RemoteAccum

    zeros = dict.fromkeys(VBA_FIELDS, 0)
    row = RemoteAccum.from_vba(
        {**KEYS, **zeros, "copay_Amt": None, "entry_User": "u" * 40, "newField": 1}
        | {"coins_Amt": "1.125"}
    )
    assert row.amounts()["copay_Amt"] == 0 and row.sub_cent() == ["coins_Amt"]
    with pytest.raises(ValueError, match="deductible_Used: not a number"):
        RemoteAccum.from_vba({**KEYS, **zeros, "deductible_Used": "lots"})


def test_a_listed_row_missing_an_amount_is_unreadable_not_zero() -> None:
    """A null amount is VBA's zero; a field VBA did not send at all is not: the row can't be
    read (its key is then refused), where reading 0 would make VBA's own share look like 0."""
    from models.vba import RemoteAccum

    row = {**KEYS, **dict.fromkeys(VBA_FIELDS, 0)}
    del row["copay_Amt_Net"]
    with pytest.raises(ValueError, match="copay_Amt_Net: missing from the row"):
        RemoteAccum.from_vba(row)
