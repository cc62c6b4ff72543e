"""VBA wire payloads in VBA's exact spelling (seeds 000 and 002): records, envelope, 207 items."""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import date, datetime
from decimal import ROUND_HALF_EVEN, Decimal
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Final, Self

from pydantic import (
    AfterValidator,
    AliasChoices,
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    create_model,
)

from models.buckets import VBA_FIELDS

CENT: Final = Decimal("0.01")
#: A sanity bound well above any accumulator (VBA stores money as SQL decimal).
MONEY_LIMIT: Final = Decimal("1e13")

#: The five fields that identify a SubscriberAccum, in path order.
SUBSCRIBER_KEY: Final[tuple[str, ...]] = (
    "subscriber_ID",
    "group_ID",
    "plan_Year",
    "plan_Type",
    "benefit_Code",
)
#: The two fields that identify a PlanAccumulator (an Added Accumulator).
PLAN_KEY: Final[tuple[str, ...]] = ("plan_ID", "accum_Name")

#: The 33 nullable limit amounts of a PlanAccumulator (seed 000), VBA's spelling.
PLAN_LIMIT_FIELDS: Final[tuple[str, ...]] = (
    *(f"annual_Max{s}" for s in ("", "_Member", "_Net", "_Net_Member", "_OON", "_OON_Member")),
    *(f"coIns_Max_{s}" for s in ("Mem", "Net_Mem", "Net_Sub", "OON_Mem", "OON_Sub", "Sub")),
    *(f"lifetime_Max{s}" for s in ("", "_Member", "_Net", "_Net_Member", "_OON", "_OON_Member")),
    "member_Ded_OON",
    "member_Ded_PPO",
    "member_Deductible",
    *(f"ooP_Max_{s}" for s in ("Mem", "Net_Mem", "Net_Sub", "OON_Mem", "OON_Sub", "Sub")),
    "subscriber_Ded_OON",
    "subscriber_Ded_PPO",
    "subscriber_Deductible",
)


def _money(value: Decimal, info: ValidationInfo) -> Decimal:
    """Cents exactly: outgoing amounts must have <= 2 decimals; VBA's doubles are rounded."""
    if not value.is_finite() or abs(value) >= MONEY_LIMIT:
        raise ValueError("amount must be a finite number below 1e13")
    cents = value.quantize(CENT, rounding=ROUND_HALF_EVEN)
    if cents != value and not (info.context or {}).get("from_vba"):
        raise ValueError("amount has more than 2 decimals")
    return cents


Money = Annotated[Decimal, AfterValidator(_money)]


class Wire(BaseModel):
    """A VBA payload: exact field names, unknown fields refused when we build one."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    @classmethod
    def from_vba(cls, payload: Mapping[str, Any]) -> Self:
        """Parse what VBA sent: unknown fields dropped, amounts rounded to cents."""
        known = {k: v for k, v in payload.items() if k in cls.model_fields}
        return cls.model_validate(known, context={"from_vba": True})

    def to_wire(self) -> dict[str, Any]:
        """The JSON-ready dict (amounts stay Decimal; :func:`dumps` writes them as numbers)."""
        return self.model_dump(mode="python")


class Record(Wire):
    """A VBA row: its key fields and VBA's audit columns."""

    KEY: ClassVar[tuple[str, ...]] = ()
    NULLABLE: ClassVar[frozenset[str]] = frozenset()
    """Fields the seed types "or null": the only ones a request may carry as null."""

    def to_request(self) -> dict[str, Any]:
        """What we send: the fields that were set, never a null the seed does not allow (a .NET
        model binder refuses the whole request for one: ``entry_Date`` is ``<date-time>``)."""
        body = self.model_dump(mode="python", exclude_unset=True)
        return {k: v for k, v in body.items() if v is not None or k in self.NULLABLE}

    entry_Date: datetime | None = None
    entry_User: str | None = None
    update_Date: datetime | None = None
    update_User: str | None = None

    @property
    def key(self) -> tuple[str, ...]:
        """The key field values, in :attr:`KEY` order."""
        return tuple(str(getattr(self, f)) for f in self.KEY)


class _SubscriberAccumBase(Record):
    KEY = SUBSCRIBER_KEY
    NULLABLE = frozenset({"added_Accum", "entry_User", "update_User"})

    subscriber_ID: str = Field(min_length=1, max_length=9)
    group_ID: str = Field(min_length=1, max_length=20)
    plan_Year: str = Field(min_length=1, max_length=8)
    plan_Type: str = Field(min_length=1, max_length=6)
    benefit_Code: str = Field(min_length=1, max_length=10)
    added_Accum: str | None = Field(default=None, max_length=1)
    entry_User: str | None = Field(default=None, max_length=20)
    update_User: str | None = Field(default=None, max_length=20)

    def amounts(self) -> dict[str, Decimal]:
        """The 30 amount fields, VBA name -> Decimal, in bucket-table order."""
        return {f: getattr(self, f) for f in VBA_FIELDS}


class _PlanAccumulatorBase(Record):
    KEY = PLAN_KEY
    NULLABLE = frozenset({*PLAN_LIMIT_FIELDS, "entry_User", "update_User"})

    plan_ID: str = Field(min_length=1)
    accum_Name: str = Field(min_length=1)


_AMOUNTS: dict[str, Any] = {name: (Money, ...) for name in VBA_FIELDS}
_LIMITS: dict[str, Any] = {name: (Money | None, None) for name in PLAN_LIMIT_FIELDS}

if TYPE_CHECKING:

    class SubscriberAccum(_SubscriberAccumBase):
        """A subscriber accumulator row; the 30 NOT NULL amounts come from models.buckets."""

    class PlanAccumulator(_PlanAccumulatorBase):
        """A plan's Added Accumulator definition (seed 000)."""

else:
    SubscriberAccum = create_model(
        "SubscriberAccum",
        __base__=_SubscriberAccumBase,
        __module__=__name__,
        __doc__="A subscriber accumulator row; the 30 NOT NULL amounts come from models.buckets.",
        **_AMOUNTS,
    )
    PlanAccumulator = create_model(
        "PlanAccumulator",
        __base__=_PlanAccumulatorBase,
        __module__=__name__,
        __doc__="A plan's Added Accumulator definition (seed 000).",
        **_LIMITS,
    )


class RemoteAccum(BaseModel):
    """A SubscriberAccum as VBA lists it, read leniently: the flush must not wedge on one odd
    row. Unknown fields are ignored, strings may be longer than the write model allows, a null
    amount reads as 0; an amount that is missing or not a number fails the row (its key is then
    known but its money is not: a field VBA did not send is not a zero)."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    subscriber_ID: str
    group_ID: str
    plan_Year: str
    plan_Type: str
    benefit_Code: str
    added_Accum: str | None = None
    money: dict[str, Decimal] = Field(default_factory=dict)

    @classmethod
    def from_vba(cls, payload: Mapping[str, Any]) -> Self:
        """Parse one listed row; ValueError (naming the field) when its money can't be read."""
        if missing := [f for f in VBA_FIELDS if f not in payload]:
            raise ValueError(f"{', '.join(missing)}: missing from the row")
        money = {f: _lenient_amount(f, payload[f]) for f in VBA_FIELDS}
        return cls.model_validate({**payload, "money": money})

    def amounts(self) -> dict[str, Decimal]:
        """The 30 amount fields, VBA name -> Decimal (every digit VBA sent)."""
        return dict(self.money)

    @property
    def key(self) -> tuple[str, ...]:
        """The key field values as VBA stored them, in :data:`SUBSCRIBER_KEY` order."""
        return tuple(str(getattr(self, f)) for f in SUBSCRIBER_KEY)

    def sub_cent(self) -> list[str]:
        """Amount fields holding more than 2 decimals (cents are all a ledger of ours holds)."""
        return [f for f, a in self.money.items() if a != a.quantize(CENT)]


def _lenient_amount(field: str, value: Any) -> Decimal:
    if value is None:
        return Decimal(0)
    try:
        amount = Decimal(str(value)) if not isinstance(value, bool) else None
    except ArithmeticError:
        amount = None
    if amount is None or not amount.is_finite():
        raise ValueError(f"{field}: not a number")
    return amount


class ProblemDetails(BaseModel):
    """VBA's error object (RFC 7807 problem details)."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    type: str | None = None
    title: str | None = None
    status: int | None = None
    detail: str | None = None
    instance: str | None = None


class Debug(BaseModel):
    """VBA's debug object; seed 000 spells ``activityID``, seed 002 ``activityId``."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    activityId: str | None = Field(
        default=None, validation_alias=AliasChoices("activityId", "activityID")
    )


class Envelope(BaseModel):
    """Every VBA answer: ``{data, error, debug}``; ``data`` is parsed by the caller."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    data: Any = None
    error: ProblemDetails | None = None
    debug: Debug | None = None

    @property
    def activity_id(self) -> str | None:
        """The id VBA support asks for."""
        return self.debug.activityId if self.debug else None


class KeyValue(BaseModel):
    """One part of a 207 item's key."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    key: str | None = None
    value: Any = None


class BatchItemWire(BaseModel):
    """One item of a 207 answer: its key, its own HTTP status and a message."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    id: list[KeyValue] = Field(default_factory=list)
    status: int
    body: str | None = None

    def key(self) -> dict[str, str]:
        """The item's key as ``{field: value}``, values as text (VBA may send numbers)."""
        return {kv.key: _text(kv.value) for kv in self.id if kv.key is not None}


def _text(value: Any) -> str:
    return "" if value is None else str(value)


def dumps(payload: Any) -> str:
    """JSON text with every Decimal written as a number with exactly 2 decimals (no float)."""
    if isinstance(payload, Decimal):
        return f"{payload.quantize(CENT, rounding=ROUND_HALF_EVEN):f}"
    if isinstance(payload, Mapping):
        items = (f"{json.dumps(str(k))}:{dumps(v)}" for k, v in payload.items())
        return "{" + ",".join(items) + "}"
    if isinstance(payload, list | tuple):
        return "[" + ",".join(dumps(v) for v in payload) + "]"
    if isinstance(payload, datetime | date):
        return json.dumps(payload.isoformat())
    return json.dumps(payload)


def loads(text: str | bytes) -> Any:
    """Parse VBA JSON with every non-integer number as Decimal (no float ever)."""
    return json.loads(text, parse_float=Decimal)
