"""ASP.NET Core's model binding as strict answers it: a JSON null the seeds don't allow is a 400."""

from __future__ import annotations

import json
import re
import secrets
from typing import Final

from starlette.responses import Response

from models.buckets import VBA_FIELDS
from models.vba import PLAN_KEY, SUBSCRIBER_KEY, PlanAccumulator, Record, SubscriberAccum

DATETIME: Final = "System.DateTime"
DOUBLE: Final = "System.Double"
STRING: Final = "System.String"
_AUDIT_DATES: Final = {"entry_Date": DATETIME, "update_Date": DATETIME}

#: The fields each write refuses a JSON null for, with the .NET type each binds to.
#:
#: Read off the request schemas. Seed 002 (SubscriberAccum): the five key fields are typed
#: ``string [1 .. n] characters``, the 30 amounts ``number <double>`` ("NOT NULL in the
#: database"), ``entry_Date`` and ``update_Date`` ``string <date-time>``; only ``added_Accum``,
#: ``entry_User`` and ``update_User`` are ``string or null``. Seed 000 (PlanAccumulator):
#: ``plan_ID`` and ``accum_Name`` are ``(string, required)``, ``entry_Date`` and ``update_Date``
#: ``(string)``; the 33 limits are ``(number,null)`` and the two users ``(string,null)``.
#: Every other field of the models is nullable (tests/unit/test_sandbox_dialect.py checks that
#: this table and the seeds' nullable fields cover the models).
NOT_NULL: Final[dict[type[Record], dict[str, str]]] = {
    SubscriberAccum: dict.fromkeys(SUBSCRIBER_KEY, STRING)
    | dict.fromkeys(VBA_FIELDS, DOUBLE)
    | _AUDIT_DATES,
    PlanAccumulator: dict.fromkeys(PLAN_KEY, STRING) | _AUDIT_DATES,
}

#: ASP.NET Core's ProblemDetails type for a 400 (.NET 8 cites RFC 9110).
BAD_REQUEST_TYPE: Final = "https://tools.ietf.org/html/rfc9110#section-15.5.1"

Path = tuple[int | str, ...]
_DECODER: Final = json.JSONDecoder()
_SPACE: Final = re.compile(r"[ \t\n\r]*")


def refusal(body: bytes, model: type[Record]) -> Response | None:
    """The 400 model binding answers when ``body`` (valid JSON) nulls a field of NOT_NULL."""
    try:
        text = body.decode("utf-8-sig")
    except UnicodeDecodeError:
        return None  # read as JSON all the same (UTF-16?): VBA's own checks decide
    types = NOT_NULL[model]
    nulls = [(path, end) for path, end in _nulls(text) if _field(path) in types]
    if not nulls:
        return None
    # System.Text.Json stops at the first value it cannot convert; a null string converts,
    # and then each [Required] one fails validation.
    values = [(path, end) for path, end in nulls if types[_field(path)] != STRING]
    if values:
        return validation_problem(_conversion(text, *values[0], types[_field(values[0][0])]))
    return validation_problem({_model_key(path): [_required(path)] for path, _ in nulls})


def validation_problem(errors: dict[str, list[str]]) -> Response:
    """ASP.NET Core's automatic 400: ProblemDetails with ``errors``, outside VBA's envelope."""
    body = {
        "type": BAD_REQUEST_TYPE,
        "title": "One or more validation errors occurred.",
        "status": 400,
        "errors": errors,
        "traceId": f"00-{secrets.token_hex(16)}-{secrets.token_hex(8)}-00",
    }
    media_type = "application/problem+json; charset=utf-8"
    text = json.dumps(body, separators=(",", ":"))  # compact, as System.Text.Json writes it
    return Response(text, status_code=400, media_type=media_type)


def _field(path: Path) -> str:
    """The field a null at ``path`` is for: a member of the body or of an item of it."""
    if len(path) == 1 and isinstance(path[0], str):
        return path[0]
    if len(path) == 2 and isinstance(path[0], int) and isinstance(path[1], str):
        return path[1]
    return ""


def _conversion(text: str, path: Path, end: int, dotnet: str) -> dict[str, list[str]]:
    line = text.count("\n", 0, end)
    start = text.rfind("\n", 0, end) + 1
    where = f"LineNumber: {line} | BytePositionInLine: {len(text[start:end].encode())}"
    json_path = "$" + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in path)
    message = f"The JSON value could not be converted to {dotnet}. Path: {json_path} | {where}."
    return {json_path: [message]}


def _model_key(path: Path) -> str:
    """ModelState's key: the C# property name (VBA's JSON is its camelCase: ``Subscriber_ID``)."""
    return "".join(f"[{p}]" if isinstance(p, int) else f".{_pascal(p)}" for p in path).lstrip(".")


def _required(path: Path) -> str:
    return f"The {_pascal(_field(path))} field is required."


def _pascal(name: str) -> str:
    return name[:1].upper() + name[1:]


def _nulls(text: str) -> list[tuple[Path, int]]:
    """Every null of a JSON text down to an item's members, with the offset just after it."""
    found: list[tuple[Path, int]] = []
    _value(text, _skip(text, 0), (), found)
    return found


def _skip(text: str, at: int) -> int:
    match = _SPACE.match(text, at)
    return match.end() if match else at


def _value(text: str, at: int, path: Path, found: list[tuple[Path, int]]) -> int:
    """Walk the value at ``at`` (deeper than an item's members: decode it whole); its end."""
    if len(path) < 2 and text[at] in "[{":
        return _container(text, at, path, found)
    value, end = _DECODER.raw_decode(text, at)
    if value is None:
        found.append((path, end))
    return end


def _container(text: str, at: int, path: Path, found: list[tuple[Path, int]]) -> int:
    """Walk an object's members or an array's elements; the offset after the closer."""
    closer = "}" if text[at] == "{" else "]"
    at, index = _skip(text, at + 1), 0
    while text[at] != closer:
        step: int | str = index
        if closer == "}":
            step, at = _DECODER.raw_decode(text, at)
            at = _skip(text, _skip(text, at) + 1)  # past the colon
        at = _skip(text, _value(text, at, (*path, step), found))
        at, index = (_skip(text, at + 1) if text[at] == "," else at), index + 1
    return at + 1
