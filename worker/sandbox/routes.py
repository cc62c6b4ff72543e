"""The emulated VBA endpoints of seeds 000 and 002, plus the login and token refresh."""

from __future__ import annotations

import asyncio
import base64
import json
import math
import secrets
import time
from collections.abc import Callable, Sequence
from typing import Any, Final, TypeVar

from pydantic import ValidationError
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from models.vba import PlanAccumulator, Record, SubscriberAccum, loads
from worker.sandbox.binding import refusal, validation_problem
from worker.sandbox.dialect import negatives
from worker.sandbox.emulator import Sandbox, envelope, problem
from worker.sandbox.state import Key

W = TypeVar("W", bound=Record)
Item = tuple[dict[str, Any], Key | None]  # a 207 item and the row key it wrote, if any
ACCUMS = "/subscribers/{subscriberID}/groups/{groupID}/accumulators"
ROW = ACCUMS + "/{planYear}/{planType}/{benefitCode}"
PLANS_BATCH = "/plans/{planID}/accumulators-batch"
SAVE_FAILED: Final = (500, "An error occurred while saving the entity")
INVALID: Final = "One or more validation errors occurred."


def describe(error: ValidationError) -> str:
    """``field: message`` for each failure, like VBA's validation detail."""
    return "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in error.errors())


async def body_of(request: Request) -> Any:
    """The JSON body with Decimal numbers; ValueError when it is not JSON."""
    return loads(await request.body() or b"null")


def _pair(request: Request) -> tuple[str, str]:
    p = request.path_params
    return (p["subscriberID"], p["groupID"])


def _row_key(request: Request) -> tuple[str, ...]:
    p = request.path_params
    names = ("subscriberID", "groupID", "planYear", "planType", "benefitCode")
    return tuple(p[n] for n in names)


async def login(request: Request, sb: Sandbox) -> Response:
    """POST /user-authentication: Basic credentials and the client id/code."""
    c, h = sb.config, request.headers
    basic = base64.b64encode(f"{c.username}:{c.password}".encode()).decode()
    if h.get("authorization") != f"Basic {basic}":
        return problem(401, "Unauthorized", "Invalid username or password")
    if (h.get("vbasoftware-client-id"), h.get("vbasoftware-client-code")) != (
        c.client_id,
        c.client_code,
    ):
        return problem(401, "Unauthorized", "Unknown client id or client code")
    return _issue(sb, refresh_token=None)


async def refresh(request: Request, sb: Sandbox) -> Response:
    """POST /user-refresh-tokens: a known refresh token renews the id token it was issued with."""
    h = request.headers
    token = h.get("refresh-token", "")
    if not token or sb.state.refresh_tokens.get(token) != h.get("expired-id-token"):
        return problem(401, "Unauthorized", "Invalid refresh token")
    return _issue(sb, refresh_token=token)


def _issue(sb: Sandbox, refresh_token: str | None) -> Response:
    id_token, ttl = secrets.token_urlsafe(32), sb.faults.token_ttl
    new_refresh = refresh_token or secrets.token_urlsafe(32)
    sb.state.issue(id_token, time.time() + ttl, new_refresh)
    result: dict[str, Any] = {"idToken": id_token, "accessToken": secrets.token_urlsafe(16)}
    result |= {"expiresIn": ttl, "tokenType": "Bearer"}
    if refresh_token is None:
        result["refreshToken"] = new_refresh
    return envelope({"authenticationResult": result})


async def create(request: Request, sb: Sandbox) -> Response:
    """POST .../accumulators: a new row; 409 when the key exists."""
    row = await _record(request, sb, SubscriberAccum)
    if isinstance(row, Response):
        return row
    if not sb.same((row.subscriber_ID, row.group_ID), _pair(request)):
        return problem(400, "Bad Request", "subscriber_ID and group_ID must match the path")
    if sb.state.get(SubscriberAccum, row.key) is not None:
        return problem(409, "Conflict", "The SubscriberAccum already exists")
    row = sb.put(row, "accumulators.create", call=request)
    return envelope(row.to_wire())


async def _record(request: Request, sb: Sandbox, model: type[W]) -> W | Response:
    """The body of a create or update as a row, or the 400 that refuses it."""
    try:
        payload = await body_of(request)
    except ValueError:
        return problem(400, "Bad Request", "The body is not JSON")
    if not isinstance(payload, dict):
        return problem(400, "Bad Request", "The body must be an object")
    if sb.strict and (refused := refusal(await request.body(), model)):
        return refused
    try:
        row = sb.parse(model, payload)
    except ValidationError as exc:
        return problem(400, INVALID, describe(exc))
    if sb.strict and (below := negatives(row)):
        return problem(400, INVALID, "; ".join(below))
    return row


async def list_rows(request: Request, sb: Sandbox) -> Response:
    """GET .../accumulators: page, pageSize, sortBy; X-Pagination header.

    Strict: 404 for a subscriber without any row, and without sortBy the order is random.
    """
    q = request.query_params
    try:
        page, size = int(q.get("page", "1")), int(q.get("pageSize", "100"))
        if page < 1 or not 1 <= size <= 1000:
            raise ValueError("page >= 1 and 1 <= pageSize <= 1000")
        specs = sort_specs(q.get("sortBy", ""))
    except ValueError as exc:
        return problem(400, "Bad Request", str(exc))
    if sb.faults.list_status is not None:
        status = sb.faults.list_status
        return problem(status, "Injected failure", f"sandbox list fault {status}")
    if gateway := sb.gateway_404():
        return gateway
    if wait := sb.list_wait():
        await asyncio.sleep(wait)  # the rows are read after it: a late answer sees newer writes
    pair = sb.fold(_pair(request))
    rows = [r for k, r in sorted(sb.state.subscriber.items()) if k[:2] == pair]
    if sb.strict and not rows and all(k[0] != pair[0] for k in sb.state.subscriber):
        return problem(404, "Not Found", "Subscriber not found")
    if sb.strict and not specs:
        sb.order_rng.shuffle(rows)  # SQL Server promises no order without ORDER BY
    shown = sort_rows(rows, specs, sb.text_order)[(page - 1) * size : page * size]
    pages = math.ceil(len(rows) / size)
    info = {"TotalCount": len(rows), "TotalPages": pages, "CurrentPage": page, "PageSize": size}
    answer = envelope([r.to_wire() for r in shown], headers={"X-Pagination": json.dumps(info)})
    sb.intrude("list", _pair(request), [r.key for r in shown])
    return answer


def sort_specs(sort_by: str) -> list[tuple[str, bool]]:
    """``Field:desc,Other:asc`` as (field, descending) pairs, names case-insensitive.

    ValueError when a field or a direction is unknown.
    """
    names = {name.casefold(): name for name in SubscriberAccum.model_fields}
    specs: list[tuple[str, bool]] = []
    for part in filter(None, (p.strip() for p in sort_by.split(","))):
        name, _, direction = part.partition(":")
        field = names.get(name.strip().casefold())
        direction = direction.strip().lower() or "asc"
        if field is None or direction not in ("asc", "desc"):
            raise ValueError(f"Invalid sortBy: {part}")
        specs.append((field, direction == "desc"))
    return specs


def sort_rows(
    rows: list[SubscriberAccum],
    specs: list[tuple[str, bool]],
    text: Callable[[str], str] = str,
) -> list[SubscriberAccum]:
    """Sort in place by :func:`sort_specs`' pairs and return the list.

    Stable sorts, so ties keep the order ``rows`` came in (the callers': key order). ``text``
    is how a string sorts (strict: as SQL Server's collation).
    """
    for field, desc in reversed(specs):  # last key first
        rows.sort(key=_by(field, text), reverse=desc)
    return rows


def _by(field: str, text: Callable[[str], str]) -> Callable[[SubscriberAccum], tuple[bool, Any]]:
    def key(row: SubscriberAccum) -> tuple[bool, Any]:
        value = getattr(row, field)
        if isinstance(value, str):
            value = text(value)
        return (value is None, "" if value is None else value)

    return key


async def get_row(request: Request, sb: Sandbox) -> Response:
    """GET .../accumulators/{planYear}/{planType}/{benefitCode}; 404 if absent."""
    row = sb.state.get(SubscriberAccum, _row_key(request))
    return envelope(row.to_wire()) if row else problem(404, "Not Found", "No such SubscriberAccum")


async def update_row(request: Request, sb: Sandbox) -> Response:
    """PUT .../accumulators/{planYear}/{planType}/{benefitCode}: the full record; 404 if absent."""
    row = await _record(request, sb, SubscriberAccum)
    if isinstance(row, Response):
        return row
    if not sb.same(row.key, _row_key(request)):
        return problem(400, "Bad Request", "The record's key must match the path")
    previous = sb.state.get(SubscriberAccum, row.key)
    if previous is None:
        return problem(404, "Not Found", "No such SubscriberAccum")
    row = sb.put(row, "accumulators.update", call=request)
    return envelope(row.to_wire())


async def delete_row(request: Request, sb: Sandbox) -> Response:
    """DELETE .../accumulators/{planYear}/{planType}/{benefitCode}: 204; 404 if absent."""
    if not sb.delete(_row_key(request), call=request):
        return problem(404, "Not Found", "No such SubscriberAccum")
    return Response(status_code=204)


async def subscriber_batch(request: Request, sb: Sandbox) -> Response:
    """PUT .../accumulators-batch: upsert each item; 207 with a status per item."""
    sid, gid = _pair(request)
    items = await _batch(request, sb, SubscriberAccum, {"subscriber_ID": sid, "group_ID": gid})
    if isinstance(items, Response):
        return items
    answer = _multi_status(sb, items, "activityId")
    sb.intrude("batch", (sid, gid), [key for _, key in items if key])
    return answer


async def plan_batch(request: Request, sb: Sandbox) -> Response:
    """PUT /plans/{planID}/accumulators-batch: upsert each Added Accumulator; 207."""
    path = {"plan_ID": request.path_params["planID"]}
    items = await _batch(request, sb, PlanAccumulator, path)
    return items if isinstance(items, Response) else _multi_status(sb, items, "activityID")


async def _batch(
    request: Request, sb: Sandbox, model: type[W], path: dict[str, str]
) -> list[Item] | Response:
    try:
        payload = await body_of(request)
    except ValueError:
        return problem(400, "Bad Request", "The body is not JSON")
    if not isinstance(payload, list):
        return problem(400, "Bad Request", "The body must be an array")
    if sb.strict and (refused := refusal(await request.body(), model)):
        return refused
    if (poison := sb.faults.refuse_batch_with) is not None and (
        refused := unbindable(payload, poison)
    ):
        return refused
    return [_upsert(request, sb, model, raw, path) for raw in payload]


def unbindable(payload: list[Any], poison: str) -> Response | None:
    """The ``refuse_batch_with`` fault: one record VBA can't bind refuses the whole request."""
    for i, raw in enumerate(payload):
        for name in ("benefit_Code", "accum_Name"):
            value = raw.get(name) if isinstance(raw, dict) else None
            if isinstance(value, str) and value.rstrip(" ").casefold() == poison.casefold():
                message = f"The value '{value}' is not valid for {name}."
                return validation_problem({f"$[{i}].{name}": [message]})
    return None


def _multi_status(sb: Sandbox, items: list[Item], activity_key: str) -> Response:
    """The 207 (seed 000 spells the plan batch's ``activityID``)."""
    data = [item for item, _ in items]
    if sb.faults.shuffle:
        sb.rng.shuffle(data)
    return envelope(data, status=207, media_type="text/plain", activity_key=activity_key)


def _upsert(request: Request, sb: Sandbox, model: type[W], raw: Any, path: dict[str, str]) -> Item:
    """One 207 item: 200 Updated, 201 Created, 400 invalid, or an injected 500.

    A written item's id echoes the stored row's key (strict: its first writer's spelling).
    """
    fields = raw if isinstance(raw, dict) else {}
    sent = [fields.get(f) for f in model.KEY]
    try:
        row = sb.parse(model, fields)
    except ValidationError as exc:
        return _item(sb, model, sent, 400, describe(exc)), None
    if sb.strict and (below := negatives(row)):
        return _item(sb, model, sent, 400, "; ".join(below)), None
    if not sb.same(tuple(getattr(row, f) for f in path), tuple(path.values())):
        return _item(sb, model, sent, 400, "The record's ids must match the path"), None
    if sb.chance(sb.faults.item_error_rate):
        return _item(sb, model, sent, *SAVE_FAILED), None
    previous = sb.state.get(model, row.key)
    status, body = (200, "Updated") if previous else (201, "Created")
    if sb.fires("item_written_errors", sb.faults.item_written_error_rate):
        status, body = SAVE_FAILED  # saved all the same: VBA failed only to say so
    op = "plans.batch" if model is PlanAccumulator else "accumulators.batch"
    row = sb.put(row, op, status=status, call=request)
    return _item(sb, model, row.key, status, body), row.key


def _item(
    sb: Sandbox, model: type[Record], values: Sequence[Any], status: int, body: str
) -> dict[str, Any]:
    return {"id": sb.ident(model, values), "status": status, "body": body}


def vba_routes(sb: Sandbox) -> list[Route]:
    """Every emulated VBA route, wrapped in the sandbox's gate, faults and counters."""
    r = sb.route
    return [
        Route("/user-authentication", r("auth.login", login, False), methods=["POST"]),
        Route("/user-refresh-tokens", r("auth.refresh", refresh, False), methods=["POST"]),
        Route(ACCUMS, r("accumulators.create", create), methods=["POST"]),
        Route(ACCUMS, r("accumulators.list", list_rows), methods=["GET"]),
        Route(ROW, r("accumulators.get", get_row), methods=["GET"]),
        Route(ROW, r("accumulators.update", update_row), methods=["PUT"]),
        Route(ROW, r("accumulators.delete", delete_row), methods=["DELETE"]),
        Route(
            ACCUMS + "-batch",
            r("accumulators.batch", subscriber_batch, batch=True),
            methods=["PUT"],
        ),
        Route(PLANS_BATCH, r("plans.batch", plan_batch, batch=True), methods=["PUT"]),
    ]
