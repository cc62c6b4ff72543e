"""ClaimEvent v1, the producer contract (docs/producers.md), and its canonical content hash."""

from __future__ import annotations

import hashlib
import json
from datetime import date
from decimal import Decimal
from typing import Annotated, Any, Final, Literal

from pydantic import (
    AwareDatetime,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictInt,
    StringConstraints,
    ValidationError,
    WithJsonSchema,
)
from pydantic_core import CoreSchema, SchemaValidator, core_schema, to_json

from models.buckets import AMOUNTS, Network

MAX_AMOUNT: Final = Decimal("999999999999.99")
CENT: Final = Decimal("0.01")
CANONICAL: Final = json.JSONEncoder(sort_keys=True, separators=(",", ":"))
"""The content hash's JSON form (one encoder, not one per call)."""
SORTED_AMOUNTS: Final = tuple(sorted(AMOUNTS))


def _no_float_artifacts(value: Any) -> Any:
    """Accept a JSON number or a decimal string; never go through binary float arithmetic.

    A float from ``json.loads`` is converted via its shortest repr (``0.1`` -> ``Decimal("0.1")``),
    so 12.34 stays exactly 12.34 and 12.345 is rejected by the two-decimal rule below.
    """
    if isinstance(value, bool):
        raise ValueError("must be a number or a decimal string, not a boolean")
    if isinstance(value, float):
        return Decimal(repr(value))
    return value


# Every constraint sits in the Field before the BeforeValidator, so pydantic-core checks them all
# in Rust; constraints listed after it would run as Python functions (a quarter of validation's
# time). A value breaking several rules is reported under the first the core checks (decimals
# before bounds): still a true reason.
AMOUNT_STRING: Final = r"^[0-9]{1,12}(\.[0-9]{1,2})?$"
"""The JSON Schema's form of an amount string: a subset of what the worker accepts (it also takes
a sign, an exponent, surrounding zeros), so a string the schema passes the worker passes too."""

Money = Annotated[
    Decimal,
    Field(ge=0, le=MAX_AMOUNT, decimal_places=2, allow_inf_nan=False),
    BeforeValidator(_no_float_artifacts),
    WithJsonSchema(
        {
            "anyOf": [
                {"type": "string", "pattern": AMOUNT_STRING},
                {"type": "number", "minimum": 0, "maximum": float(MAX_AMOUNT)},
            ],
            "description": "dollars, >= 0, at most 2 decimals; a decimal string is exact, and "
            "the schema cannot check a JSON number's decimals (the worker refuses more than 2)",
        }
    ),
]


PRINTABLE: Final = r"^[^\x00-\x1f\x7f]*$"
"""No control characters: Postgres refuses NUL in text, and none belongs in an id or a code."""


KEY_PRINTABLE: Final = r"^[\x20-\x7e]*[\x21-\x7e][\x20-\x7e]*$"
"""A key value: printable ASCII, and not only spaces (VBA ignores trailing spaces). Beyond
ASCII, SQL Server's case-insensitive collations fold letters (``é``/``É``, and by collation
``ß``/``SS``) in ways :func:`canon` cannot reproduce exactly, and two of our keys would then
write their absolute totals to one VBA row: such a key is refused at the edge instead."""


def _text(max_length: int, pattern: str = PRINTABLE) -> StringConstraints:
    return StringConstraints(strict=True, min_length=1, max_length=max_length, pattern=pattern)


Str2 = Annotated[str, _text(2)]
Key6 = Annotated[str, _text(6, KEY_PRINTABLE)]
Key8 = Annotated[str, _text(8, KEY_PRINTABLE)]
Key9 = Annotated[str, _text(9, KEY_PRINTABLE)]
Key10 = Annotated[str, _text(10, KEY_PRINTABLE)]
Key20 = Annotated[str, _text(20, KEY_PRINTABLE)]
Str64 = Annotated[str, _text(64)]
Str128 = Annotated[str, _text(128)]


class Amounts(BaseModel):
    """The ten amounts of a claim version; each >= 0 with at most 2 decimals, missing = 0."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    allowed: Money = Decimal(0)
    billed: Money = Decimal(0)
    benefit_used: Money = Decimal(0)
    cob: Money = Decimal(0)
    coinsurance: Money = Decimal(0)
    copay: Money = Decimal(0)
    deductible: Money = Decimal(0)
    deductible_credit: Money = Decimal(0)
    not_covered: Money = Decimal(0)
    out_of_pocket: Money = Decimal(0)

    def cents(self) -> dict[str, int]:
        """Each amount in integer cents (exact: at most 2 decimals were admitted)."""
        return {name: int(getattr(self, name) * 100) for name in AMOUNTS}


class ClaimEvent(BaseModel):
    """One version of one claim (or claim line), as a producer publishes it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    event_id: Str128 = Field(description="unique per event: the idempotency key")
    claim_id: Str64 = Field(description="the unit later versions replace (claim, or claim + line)")
    version: Annotated[StrictInt, Field(ge=0, le=2**31 - 1)] = Field(
        description="adjustment sequence, an integer without a fraction; a higher version "
        "replaces a lower one"
    )
    status: Literal["adjudicated", "reversed"] = Field(
        description="reversed: the claim contributes nothing from this version on"
    )
    subscriber_id: Key9 = Field(description="VBA subscriber_ID")
    group_id: Key20 = Field(description="VBA group_ID")
    plan_year: Key8 = Field(description="VBA plan_Year code")
    plan_type: Key6 = Field(description="VBA plan_Type")
    benefit_code: Key10 = Field(description="VBA benefit_Code")
    network: Network = Field(description="in-network (_Net/PPO columns) or out-of-network (_OON)")
    member_seq: Str2 | None = Field(default=None, description="stored for member-level accums")
    service_date: date | None = Field(default=None, description="stored, not used for arithmetic")
    adjudicated_at: AwareDatetime | None = Field(
        default=None, description="RFC 3339 with its offset; stored, not used for arithmetic"
    )
    amounts: Amounts = Field(default=Amounts(), description="missing amounts are 0")

    @property
    def key(self) -> AccumKey:
        """The VBA accumulator this version's money lands in, in canonical form (:func:`canon`):
        keys that VBA's collation takes as one row are one ledger key."""
        return (
            canon(self.subscriber_id),
            canon(self.group_id),
            canon(self.plan_year),
            canon(self.plan_type),
            canon(self.benefit_code),
        )

    def content_hash(self) -> str:
        """SHA-256 of the canonical content, event_id excluded.

        Two deliveries are "the same content" exactly when these hashes match: amounts compare as
        numbers (``"5"`` == ``5.00``), field order and absent-vs-default do not matter.

        The canonical content is the JSON of the fields, keys sorted, compact, ASCII-escaped, the
        amounts as two-decimal strings (:meth:`canonical_json`). Hashes are stored and compared
        with redeliveries for ever, so that text must never change: pydantic-core writes it here
        (a key-ordered dict, 2x faster than ``json``'s encoder), and any text beyond ASCII, which
        pydantic-core would not escape, goes through the encoder as before
        (tests/unit/test_events.py holds the two to the same bytes for any event).
        """
        body = to_json(self._hashed_fields())
        if not body.isascii():
            body = self.canonical_json().encode()
        return hashlib.sha256(body).hexdigest()

    def canonical_json(self) -> str:
        """The content hash's text, by ``json``'s encoder (sorted keys, ASCII escapes)."""
        # The amounts are not dumped only to be replaced: they were most of the dump's cost.
        body = self.model_dump(mode="json", exclude={"event_id", "amounts"})
        body["amounts"] = {k: str(v.quantize(CENT)) for k, v in self.amounts.__dict__.items()}
        return CANONICAL.encode(body)

    def _hashed_fields(self) -> dict[str, Any]:
        """The hashed fields as :meth:`canonical_json` writes them, in its (sorted) key order."""
        return {
            "adjudicated_at": self.adjudicated_at,
            "amounts": amount_texts(self.amounts.__dict__),
            "benefit_code": self.benefit_code,
            "claim_id": self.claim_id,
            "group_id": self.group_id,
            "member_seq": self.member_seq,
            "network": self.network,
            "plan_type": self.plan_type,
            "plan_year": self.plan_year,
            "service_date": self.service_date,
            "status": self.status,
            "subscriber_id": self.subscriber_id,
            "version": self.version,
        }


ZERO_TEXTS: Final = dict.fromkeys(SORTED_AMOUNTS, "0.00")


def amount_texts(amounts: dict[str, Decimal]) -> dict[str, str]:
    """Each amount as ``str(amount.quantize(CENT))``, in sorted key order, the quantize skipped
    for a zero (most of an event's ten amounts: it was two thirds of these texts' time). A
    negative zero keeps its sign, as quantize writes it."""
    texts = ZERO_TEXTS.copy()
    for name, amount in amounts.items():
        if amount:
            texts[name] = str(amount.quantize(CENT))
        elif amount.is_signed():
            texts[name] = "-0.00"
    return texts


AccumKey = tuple[str, str, str, str, str]
"""(subscriber_id, group_id, plan_year, plan_type, benefit_code): one VBA SubscriberAccum row."""

KEY_FIELDS: Final = ("subscriber_id", "group_id", "plan_year", "plan_type", "benefit_code")
_ASCII_UPPER: Final = str.maketrans("abcdefghijklmnopqrstuvwxyz", "ABCDEFGHIJKLMNOPQRSTUVWXYZ")


def canon(value: str) -> str:
    """A key value as VBA's SQL Server collation compares it (case-insensitive, trailing spaces
    ignored): trailing spaces removed, ASCII letters upper-cased. Key values are printable ASCII
    (:data:`KEY_PRINTABLE`), so that is the whole of the collation's folding for them. Other
    text (a VBA row, an operator's argument) has only its ASCII letters upper-cased too.

    ``str.upper`` is that fold for ASCII text and takes a fifth of ``translate``'s time (the
    key's five calls were a third of a received row's building)."""
    value = value.rstrip(" ")
    return value.upper() if value.isascii() else value.translate(_ASCII_UPPER)


AMOUNT_TEXT: Final = core_schema.chain_schema(
    [core_schema.str_schema(strict=True, pattern=AMOUNT_STRING), core_schema.decimal_schema()]
)
"""A plain amount string (:data:`AMOUNT_STRING`: 1 to 12 digits, at most 2 decimals, ASCII) as
its ``Decimal``, checked by the pattern alone in pydantic-core: whatever it accepts, ``Money``
accepts as the same ``Decimal`` (``Decimal(text)``), and its bounds, decimals and finiteness
cannot fail."""


def _amount_text_first(node: Any) -> Any:
    """A copy of a core schema in which every ``Money`` validator first tries the amount as a
    plain amount string (:data:`AMOUNT_TEXT`) and, for anything else, runs as it was."""
    if isinstance(node, dict):
        function = node.get("function")
        if isinstance(function, dict) and function.get("function") is _no_float_artifacts:
            return core_schema.union_schema([AMOUNT_TEXT, node], mode="left_to_right")
        return {k: _amount_text_first(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_amount_text_first(v) for v in node]
    return node


def _built_anew(schema: CoreSchema, *models: type[BaseModel]) -> SchemaValidator:
    """A validator of ``schema`` in which ``models`` are validated as ``schema`` says.

    pydantic-core reuses a complete model's own validator wherever a schema names its class, so
    a changed copy of the model's schema would be ignored: the models are marked incomplete
    while it is built (at import, before any other thread can look), then complete again.
    tests/unit/test_events.py checks that nothing was reused."""
    for model in models:
        model.__pydantic_complete__ = False
    try:
        return SchemaValidator(schema)
    finally:
        for model in models:
            model.__pydantic_complete__ = True


EVENT_BATCH: Final = _built_anew(
    core_schema.list_schema(_amount_text_first(ClaimEvent.__pydantic_core_schema__)),
    ClaimEvent,
    Amounts,
)
"""A batch (a list of events) validated in one call into pydantic-core into ``ClaimEvent``
instances, as ``TypeAdapter(list[ClaimEvent])`` would, in about three quarters of its time.
``Money``'s checks (a Python call before, then bounds, decimals and finiteness, each a call into
Python's ``decimal``) were about 40% of a batch's validation, and the plain amount string that
``publish`` sends for a ``Decimal`` passes them all by its pattern alone (bench/README.md,
finding 23). The same input gives the same events both ways, or fails both ways
(tests/unit/test_events.py). Its errors are not read: a batch that fails is validated event by
event (``ClaimEvent.model_validate``), whose reasons name the field and the rule."""


SCHEMA_ID: Final = "urn:accumsync:schema:claim-event:v1"


def json_schema() -> dict[str, Any]:
    """ClaimEvent v1 as a JSON Schema (draft 2020-12), for producers that validate before they
    publish; ``schemas/claim_event.v1.json`` is this, written by ``accumsync schema``."""
    body = _end_is_the_end(ClaimEvent.model_json_schema(mode="validation"))
    body["title"] = "ClaimEvent v1"
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", "$id": SCHEMA_ID, **body}


def _end_is_the_end(node: Any) -> Any:
    """Each ``pattern`` ending in ``$`` also refuses a final newline: ``$`` means the end of the
    text to ECMA-262 and to the worker's validator, but Python's ``re`` (and so the
    ``jsonschema`` package) also lets it match before a final ``\n``, which passed ``"0\n"``
    as a benefit code the worker refuses. A lookahead says the same to every engine."""
    if isinstance(node, dict):
        fixed = {k: _end_is_the_end(v) for k, v in node.items()}
        pattern = fixed.get("pattern")
        if isinstance(pattern, str) and pattern.endswith("$"):
            fixed["pattern"] = pattern + r"(?!\n)"
        return fixed
    if isinstance(node, list):
        return [_end_is_the_end(v) for v in node]
    return node


def describe(error: ValidationError) -> str:
    """A reason naming each failing field and its rule: ``amounts.copay: at most 2 decimals``."""
    parts = []
    for e in error.errors(include_url=False):
        loc = ".".join(str(p) for p in e["loc"]) or "event"
        parts.append(f"{loc}: {_rule(e)}")
    return "; ".join(parts)


def _rule(e: Any) -> str:
    kind, ctx = e["type"], e.get("ctx", {})
    rules = {
        "extra_forbidden": "unknown field (ClaimEvent v1 rejects unknown fields)",
        "missing": "required field is missing",
        "string_too_short": f"must be at least {ctx.get('min_length')} characters",
        "string_too_long": f"must be at most {ctx.get('max_length')} characters",
        "decimal_max_places": f"at most {ctx.get('decimal_places')} decimals",
        "greater_than_equal": f"must be >= {ctx.get('ge')}",
        "less_than_equal": f"must be <= {ctx.get('le')}",
        "literal_error": f"must be one of {ctx.get('expected')}",
        "string_pattern_mismatch": _pattern_rule(ctx.get("pattern")),
        "timezone_aware": "must carry a UTC offset (RFC 3339: ...Z or ...+HH:MM)",
    }
    return rules.get(kind, str(e["msg"]))


def _pattern_rule(pattern: str | None) -> str:
    if pattern == KEY_PRINTABLE:
        return (
            "must be printable ASCII and not only spaces (VBA's collation folds other letters "
            "in ways accumsync can't match exactly: two keys could land on one VBA row)"
        )
    return "must not contain control characters (U+0000-U+001F, U+007F)"
