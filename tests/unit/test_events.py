"""ClaimEvent v1: every rule of docs/producers.md, each failure naming its field and rule."""

from __future__ import annotations

import hashlib
from datetime import UTC, timedelta, timezone
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import TypeAdapter, ValidationError
from pydantic_core import to_json

from models.buckets import AMOUNTS
from models.events import EVENT_BATCH, KEY_FIELDS, ClaimEvent, canon, describe

BASE: dict[str, Any] = {
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


def reason(**changes: Any) -> str:
    """The dead-letter reason an event with ``changes`` would get."""
    with pytest.raises(ValidationError) as info:
        ClaimEvent.model_validate({**BASE, **changes})
    return describe(info.value)


def test_valid_event_parses_amounts_exactly() -> None:
    """Amounts parse to exact Decimals and cents; missing amounts are zero."""
    event = ClaimEvent.model_validate(BASE)
    assert event.amounts.copay == Decimal("25.00")
    assert event.amounts.cents()["deductible"] == 10_000
    assert event.amounts.cents()["billed"] == 0


@pytest.mark.parametrize(
    ("field", "limit"),
    [
        ("event_id", 128),
        ("claim_id", 64),
        ("subscriber_id", 9),
        ("group_id", 20),
        ("plan_year", 8),
        ("plan_type", 6),
        ("benefit_code", 10),
        ("member_seq", 2),
    ],
)
def test_string_lengths(field: str, limit: int) -> None:
    """Each string field accepts 1..limit characters and names itself and the rule otherwise."""
    ClaimEvent.model_validate({**BASE, field: "x" * limit})
    ClaimEvent.model_validate({**BASE, field: "x"})
    assert reason(**{field: "x" * (limit + 1)}) == f"{field}: must be at most {limit} characters"
    assert reason(**{field: ""}) == f"{field}: must be at least 1 characters"


@pytest.mark.parametrize("field", ["event_id", "claim_id", "subscriber_id", "member_seq"])
@pytest.mark.parametrize("char", ["\x00", "\n", "\x1f", "\x7f"])
def test_control_characters_are_refused(field: str, char: str) -> None:
    """NUL made Postgres refuse the whole batch; no control character belongs in an id."""
    rule = "must not contain control characters (U+0000-U+001F, U+007F)"
    if field in KEY_FIELDS:
        rule = ASCII_KEY
    assert reason(**{field: f"{char}1"}) == f"{field}: {rule}"


ASCII_KEY = (
    "must be printable ASCII and not only spaces (VBA's collation folds other letters in ways "
    "accumsync can't match exactly: two keys could land on one VBA row)"
)


@pytest.mark.parametrize("field", KEY_FIELDS)
def test_a_key_of_only_spaces_is_refused(field: str) -> None:
    """VBA ignores trailing spaces: a key value of spaces only would be an empty key there."""
    assert reason(**{field: "   "}) == f"{field}: {ASCII_KEY}"


@pytest.mark.parametrize("field", KEY_FIELDS)
@pytest.mark.parametrize("value", ["CAFÉ", "café", "Straße", "ÅB", "DED\u00a0"])
def test_a_key_beyond_ascii_is_refused_with_its_reason(field: str, value: str) -> None:
    """SQL Server's case-insensitive collations fold é/É (and, by collation, ß/SS), which the
    ledger's ASCII folding does not: "CAFÉ" and "café" would be two ledger keys writing their
    absolute totals to one VBA row (30.00 where the truth was 130.00). Such keys are refused at
    the edge, naming the field and the rule, and other fields may still hold any text."""
    assert reason(**{field: value[:6]}) == f"{field}: {ASCII_KEY}"
    ClaimEvent.model_validate({**BASE, "claim_id": "réclamation-ß", "event_id": "é-1"})


def test_keys_vba_takes_as_one_row_are_one_ledger_key() -> None:
    """SQL Server's default collation ignores case and trailing spaces: so does the ledger key
    (trailing spaces removed, ASCII upper-cased); the content hash is over what was sent."""
    plain = ClaimEvent.model_validate(BASE)
    odd = ClaimEvent.model_validate(
        {**BASE, "subscriber_id": "s0000001 ", "plan_type": "med", "benefit_code": "Ded  "}
    )
    assert odd.key == plain.key == ("S0000001", "GRP001", "2026", "MED", "DED")
    assert odd.content_hash() != plain.content_hash()
    assert canon("ded ") == "DED"


@given(st.text())
def test_canon_folds_ascii_letters_only(value: str) -> None:
    """Whatever the text, only trailing spaces go and only ASCII letters change case (``ß``,
    ``é`` and ``ﬁ`` stay as they are, which ``str.upper`` alone would not leave)."""
    ascii_upper = str.maketrans("abcdefghijklmnopqrstuvwxyz", "ABCDEFGHIJKLMNOPQRSTUVWXYZ")
    assert canon(value) == value.rstrip(" ").translate(ascii_upper)
    assert canon("straße é ﬁ ") == "STRAßE é ﬁ"


def test_adjudicated_at_needs_an_offset() -> None:
    """A timestamp without an offset is ambiguous (and was refused by the store, batch and all)."""
    assert reason(adjudicated_at="2026-03-05T10:11:12") == (
        "adjudicated_at: must carry a UTC offset (RFC 3339: ...Z or ...+HH:MM)"
    )
    aware = ClaimEvent.model_validate({**BASE, "adjudicated_at": "2026-03-05T10:11:12Z"})
    assert aware.adjudicated_at is not None and aware.adjudicated_at.utcoffset() is not None


@pytest.mark.parametrize(
    "field",
    [
        "event_id",
        "claim_id",
        "version",
        "status",
        "subscriber_id",
        "group_id",
        "plan_year",
        "plan_type",
        "benefit_code",
        "network",
    ],
)
def test_required_fields(field: str) -> None:
    """Every required field missing is reported by name."""
    event = dict(BASE)
    del event[field]
    with pytest.raises(ValidationError) as info:
        ClaimEvent.model_validate(event)
    assert describe(info.value) == f"{field}: required field is missing"


def test_optional_fields_may_be_absent() -> None:
    """member_seq, service_date, adjudicated_at and amounts are optional."""
    event = {k: v for k, v in BASE.items() if k != "amounts"}
    parsed = ClaimEvent.model_validate(event)
    assert parsed.member_seq is None
    assert sum(parsed.amounts.cents().values()) == 0


@pytest.mark.parametrize("value", ["paid", "ADJUDICATED", "", None])
def test_status_enum(value: Any) -> None:
    """status is adjudicated or reversed, nothing else."""
    assert reason(status=value).startswith("status: ")


@pytest.mark.parametrize("value", ["IN", "oon", "partner"])
def test_network_enum(value: str) -> None:
    """network is in or out."""
    assert reason(network=value) == "network: must be one of 'in' or 'out'"


@pytest.mark.parametrize("value", [-1, "1", 1.5, True, 2**31])
def test_version_is_a_non_negative_integer(value: Any) -> None:
    """version is an integer >= 0 (no strings, floats or booleans)."""
    assert reason(version=value).startswith("version: ")


@pytest.mark.parametrize(
    ("amount", "rule"),
    [
        ("12.345", "at most 2 decimals"),
        (12.345, "at most 2 decimals"),
        ("-0.01", "must be >= 0"),
        (-5, "must be >= 0"),
        ("NaN", "Input should be a finite number"),
        ("ten", "Input should be a valid decimal"),
        (True, "Value error, must be a number or a decimal string, not a boolean"),
    ],
)
def test_amount_rules(amount: Any, rule: str) -> None:
    """Amounts are >= 0 with at most 2 decimals; the reason names amounts.<name> and the rule."""
    assert reason(amounts={"copay": amount}) == f"amounts.copay: {rule}"


@pytest.mark.parametrize("amount", ["0", "0.1", "12.30", 12.3, 7, "999999999999.99"])
def test_amounts_accept_numbers_and_decimal_strings(amount: Any) -> None:
    """A JSON number or a decimal string with up to 2 decimals is accepted exactly."""
    event = ClaimEvent.model_validate({**BASE, "amounts": {"copay": amount}})
    assert event.amounts.copay == Decimal(str(amount))


def test_unknown_top_level_field_is_rejected() -> None:
    """A typo must not drop money silently: unknown fields are refused by name."""
    assert reason(copay=5) == "copay: unknown field (ClaimEvent v1 rejects unknown fields)"


def test_unknown_amount_is_rejected() -> None:
    """An amount name outside the ten is refused by name."""
    assert reason(amounts={"copy": 5}) == (
        "amounts.copy: unknown field (ClaimEvent v1 rejects unknown fields)"
    )


def test_several_failures_are_all_named() -> None:
    """Every failing field appears in the reason."""
    text = reason(subscriber_id="1234567890", network="x", amounts={"copay": "1.001"})
    assert "subscriber_id:" in text
    assert "network:" in text
    assert "amounts.copay:" in text


def test_content_hash_ignores_event_id_and_number_spelling() -> None:
    """The same content spelled differently ("5" vs 5.00, order, explicit zeros) hashes alike."""
    a = ClaimEvent.model_validate({**BASE, "amounts": {"copay": "5", "billed": 0}})
    b = ClaimEvent.model_validate({**BASE, "event_id": "other", "amounts": {"copay": 5.00}})
    c = ClaimEvent.model_validate({**BASE, "amounts": {"copay": "5.01"}})
    assert a.content_hash() == b.content_hash() != c.content_hash()


def test_content_hash_is_stable_across_releases() -> None:
    """Hashes are stored (dedup and conflict checks): a change to them would turn every
    redelivery of an already-received event into a conflict. Pinned values of release 0.1."""
    full = {
        **BASE,
        "member_seq": "01",
        "service_date": "2026-03-04",
        "adjudicated_at": "2026-03-05T10:11:12.345678+02:00",
        "amounts": {"copay": "25.5", "deductible": 100, "out_of_pocket": "0.07"},
    }
    assert ClaimEvent.model_validate(BASE).content_hash() == (
        "a49f20b14b99d7f76716a141e86d645b94030c2473d0e3d4b0f1125fb78e023f"
    )
    assert ClaimEvent.model_validate(full).content_hash() == (
        "28b0a1b1694ee6c2013aabb2b35de712d5fe738059c756c0bcbe3851a2b09f9e"
    )


printable = st.text(
    st.characters(min_codepoint=0x20, blacklist_categories=("Cs",), blacklist_characters="\x7f"),
    min_size=1,
)
key_text = st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1)
money = st.decimals(min_value=0, max_value=Decimal("999999999999.99"), places=2)
spelled = st.one_of(
    money,
    money.map(str),
    money.map(lambda d: f"{d:.2f}"),
    st.integers(0, 10**6),
    money.map(float),
)


@st.composite
def raw_event(draw: st.DrawFn) -> dict[str, Any]:
    """Any valid event as a producer sends it: text beyond ASCII where the contract allows it,
    any date and offset, amounts spelled as decimals, strings, integers or floats."""
    stamp = st.datetimes(timezones=st.sampled_from([UTC, timezone(timedelta(hours=5, minutes=30))]))
    raw: dict[str, Any] = {
        "event_id": draw(printable.map(lambda t: t[:128])),
        "claim_id": draw(printable.map(lambda t: t[:64])),
        "version": draw(st.integers(0, 2**31 - 1)),
        "status": draw(st.sampled_from(["adjudicated", "reversed"])),
        "subscriber_id": draw(key_text.map(lambda t: t[:9])),
        "group_id": draw(key_text.map(lambda t: t[:20])),
        "plan_year": draw(key_text.map(lambda t: t[:8])),
        "plan_type": draw(key_text.map(lambda t: t[:6])),
        "benefit_code": draw(key_text.map(lambda t: t[:10])),
        "network": draw(st.sampled_from(["in", "out"])),
        "member_seq": draw(st.none() | printable.map(lambda t: t[:2])),
        "service_date": draw(st.none() | st.dates().map(str)),
        "adjudicated_at": draw(st.none() | stamp.map(lambda d: d.isoformat())),
        "amounts": draw(st.dictionaries(st.sampled_from(sorted(AMOUNTS)), spelled, max_size=10)),
    }
    return raw


def any_event() -> st.SearchStrategy[ClaimEvent]:
    """Any valid event (:func:`raw_event`), validated."""
    return raw_event().map(ClaimEvent.model_validate)


@pytest.mark.parametrize("zero", ["0", "-0", "-0.00", "0E+3", "0.0", 0])
def test_a_zero_amount_hashes_as_quantize_writes_it(zero: Any) -> None:
    """Zeros skip the quantize in the content hash: each spelling hashes the bytes
    ``canonical_json`` writes (a negative zero is ``-0.00`` there, and stays so)."""
    event = ClaimEvent.model_validate(
        {
            "event_id": "e",
            "claim_id": "c",
            "version": 1,
            "status": "adjudicated",
            "subscriber_id": "S1",
            "group_id": "G",
            "plan_year": "2026",
            "plan_type": "MED",
            "benefit_code": "B",
            "network": "in",
            "amounts": {"copay": zero, "deductible": "1.5"},
        }
    )
    assert event.content_hash() == hashlib.sha256(event.canonical_json().encode()).hexdigest()


@given(any_event())
def test_content_hash_is_the_canonical_json_for_any_event(event: ClaimEvent) -> None:
    """The fast path (pydantic-core) hashes the same bytes as the encoder did, for any event;
    and it hashes every field but event_id."""
    assert event.content_hash() == hashlib.sha256(event.canonical_json().encode()).hexdigest()
    assert set(event._hashed_fields()) == set(ClaimEvent.model_fields) - {"event_id"}


#: Amounts a producer might send, right or wrong: every spelling :data:`spelled` draws, texts
#: near the plain form (signs, exponents, spaces, a final newline, underscores, digits beyond
#: ASCII, too many digits or decimals), and values of other types.
amount_like = st.one_of(
    spelled,
    st.from_regex(r"[ +\-0-9._eE\n\u0660-\u0669\uff10-\uff19]{0,18}", fullmatch=True),
    st.from_regex(r"[0-9]{1,14}(\.[0-9]{0,3})?", fullmatch=True),
    st.builds("{}.{}".format, st.integers(10**11, 10**13), st.integers(0, 999)),
    st.integers(10**11, 10**13).map(str),
    st.decimals(allow_nan=True, allow_infinity=True),
    st.floats(),
    st.integers(),
    st.booleans(),
    st.none(),
)
ONE_BY_ONE: Any = TypeAdapter(list[ClaimEvent])


@given(raw_event(), st.dictionaries(st.sampled_from(sorted(AMOUNTS)), amount_like, max_size=3))
def test_a_batch_validates_as_the_model_does(raw: dict[str, Any], amounts: dict[str, Any]) -> None:
    """``EVENT_BATCH``, which checks a plain amount string by its pattern alone, accepts what the
    model accepts and gives the same events, each amount the same ``Decimal`` to its exponent
    (the hash's text and the cents come from it), from the objects and from their JSON text;
    what the model refuses it refuses."""
    batch = [raw | {"amounts": raw["amounts"] | amounts}]
    for form in (lambda b: b, lambda b: to_json(b, inf_nan_mode="strings").decode()):
        expected, got = outcome(ONE_BY_ONE, form(batch)), outcome(EVENT_BATCH, form(batch))
        assert got == expected


def outcome(validator: Any, batch: Any) -> Any:
    """What a validator makes of a batch: each event and the exact form of each amount, or
    that it refused the batch."""
    validate = validator.validate_json if isinstance(batch, str) else validator.validate_python
    try:
        events = validate(batch)
    except ValidationError:
        return "refused"
    return [(type(e), e, {k: v.as_tuple() for k, v in e.amounts}) for e in events]


def test_a_batch_is_validated_by_its_own_amount_checks() -> None:
    """``EVENT_BATCH`` runs the schema it was built from, not the models' own validators, which
    pydantic-core would reuse otherwise: a plain amount string is checked by its pattern, and
    a wrong one by ``Money``'s checks (reused, they would be as exact and about 30% slower)."""
    built = repr(EVENT_BATCH)  # pydantic-core's debug form of the validators it built
    assert "Prebuilt" not in built
    assert built.count("UnionValidator") == len(AMOUNTS)
