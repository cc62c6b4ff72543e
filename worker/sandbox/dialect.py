"""The strict dialect's rules: SQL Server's collation, exact amounts, Accept, 207 key names."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping
from decimal import Decimal
from typing import Any, Final, TypeVar

from models.buckets import VBA_FIELDS
from models.vba import PLAN_LIMIT_FIELDS, PlanAccumulator, Record, SubscriberAccum
from models.vba import dumps as vba_dumps

W = TypeVar("W", bound=Record)
Key = tuple[str, ...]
Fold = Callable[[Key], Key]

#: The validation context under which models.vba's Money rounds to cents instead of refusing.
FROM_VBA: Final[dict[str, Any]] = {"from_vba": True}

#: The amount fields of each row model: those strict keeps exact and refuses below zero.
AMOUNTS: Final[dict[type[Record], tuple[str, ...]]] = {
    SubscriberAccum: VBA_FIELDS,
    PlanAccumulator: PLAN_LIMIT_FIELDS,
}

#: A 207 item's key names with ``id_spelling="camel"``: the path parameters' spelling.
CAMEL: Final[dict[str, str]] = {
    "subscriber_ID": "subscriberID",
    "group_ID": "groupID",
    "plan_Year": "planYear",
    "plan_Type": "planType",
    "benefit_Code": "benefitCode",
    "plan_ID": "planID",
    "accum_Name": "accumName",
}


def exact(key: Key) -> Key:
    """Lax: a key is equal only to itself, spelled the same."""
    return key


def collate(key: Key) -> Key:
    """Strict: a key as SQL Server's default collation compares it (any case, trailing spaces)."""
    return tuple(collate_text(part) for part in key)


def collate_text(text: str) -> str:
    """One string as SQL Server's default collation compares and sorts it."""
    # SQL Server pads the shorter string with spaces before comparing (ANSI), so only spaces go.
    return text.rstrip(" ").casefold()


def exact_amounts(fields: Iterable[str], sent: Mapping[str, Any]) -> dict[str, Decimal]:
    """The ``fields`` of ``sent`` that are numbers, every digit kept (validation rounds them)."""
    exact: dict[str, Decimal] = {}
    for name in fields:
        value = sent.get(name)
        if isinstance(value, Decimal | int) and not isinstance(value, bool):
            exact[name] = Decimal(value)
    return exact


def keep_digits(row: W, sent: Mapping[str, Any]) -> W:
    """``row`` (validated, so rounded to cents) with its amounts exactly as ``sent``."""
    return row.model_copy(update=exact_amounts(AMOUNTS[type(row)], sent))


def negatives(row: Record) -> list[str]:
    """VBA's message for each amount below zero; empty when the row may be written."""
    amounts = ((name, getattr(row, name)) for name in AMOUNTS[type(row)])
    return [f"{name}: must not be negative" for name, v in amounts if v is not None and v < 0]


def acceptable(accept: str | None, media_type: str) -> bool:
    """Whether an Accept header admits ``media_type``; an absent or empty one admits anything."""
    if not accept or not accept.strip():
        return True
    admitted = {"*/*", media_type, media_type.split("/")[0] + "/*"}
    ranges = (part.split(";") for part in accept.split(","))
    return any(r[0].strip().lower() in admitted and _quality(r[1:]) > 0 for r in ranges)


def _quality(params: list[str]) -> float:
    """The ``q`` of a media range (1 when absent; an unreadable one counts as absent)."""
    for param in params:
        name, _, value = param.partition("=")
        if name.strip().lower() == "q":
            try:
                return float(value)
            except ValueError:
                return 1.0
    return 1.0


def dumps(payload: Any) -> str:
    """JSON as models.vba writes it, except that an amount with more than 2 decimals keeps them.

    Only strict stores such amounts, so lax answers byte for byte as models.vba.dumps would.
    """
    if isinstance(payload, Decimal):
        exponent = payload.as_tuple().exponent
        return f"{payload:f}" if isinstance(exponent, int) and exponent < -2 else vba_dumps(payload)
    if isinstance(payload, Mapping):
        items = (f"{json.dumps(str(k))}:{dumps(v)}" for k, v in payload.items())
        return "{" + ",".join(items) + "}"
    if isinstance(payload, list | tuple):
        return "[" + ",".join(dumps(v) for v in payload) + "]"
    return vba_dumps(payload)
