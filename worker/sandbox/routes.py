"""The emulated VBA endpoints of seeds 000 and 002, plus the login and token refresh."""

from __future__ import annotations

import base64
import json
import math
import secrets
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, TypeVar

from pydantic import ValidationError
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from models.vba import PlanAccumulator, Record, SubscriberAccum, loads
from worker.sandbox.emulator import Sandbox, envelope, problem

W = TypeVar("W", bound=Record)
ACCUMS = "/subscribers/{subscriberID}/groups/{groupID}/accumulators"
ROW = ACCUMS + "/{planYear}/{planType}/{benefitCode}"
PLANS_BATCH = "/plans/{planID}/accumulators-batch"


def describe(error: ValidationError) -> str:
    """``field: message`` for each failure, like VBA's validation detail."""
    return "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in error.errors())


def stamp(row: W, previous: Record | None, user: str) -> W:
    """Set entry/update date and user as VBA does on a write."""
    now = datetime.now(UTC)
    entry_date, entry_user = (previous.entry_Date, previous.entry_User) if previous else (now, user)
    audit = {"entry_Date": entry_date, "entry_User": entry_user}
    return row.model_copy(update=audit | {"update_Date": now, "update_User": user})


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
    row = await _record(request, SubscriberAccum)
    if isinstance(row, Response):
        return row
    if (row.subscriber_ID, row.group_ID) != _pair(request):
        return problem(400, "Bad Request", "subscriber_ID and group_ID must match the path")
    if row.key in sb.state.subscriber:
        return problem(409, "Conflict", "The SubscriberAccum already exists")
    row = stamp(row, None, sb.config.username)
    sb.state.put(row)
    return envelope(row.to_wire())


async def _record(request: Request, model: type[W]) -> W | Response:
    try:
        payload = await body_of(request)
    except ValueError:
        return problem(400, "Bad Request", "The body is not JSON")
    if not isinstance(payload, dict):
        return problem(400, "Bad Request", "The body must be an object")
    try:
        return model.from_vba(payload)
    except ValidationError as exc:
        return problem(400, "One or more validation errors occurred.", describe(exc))


async def list_rows(request: Request, sb: Sandbox) -> Response:
    """GET .../accumulators: page, pageSize, sortBy; X-Pagination header."""
    q = request.query_params
    try:
        page, size = int(q.get("page", "1")), int(q.get("pageSize", "100"))
        if page < 1 or not 1 <= size <= 1000:
            raise ValueError("page >= 1 and 1 <= pageSize <= 1000")
        rows = [r for k, r in sorted(sb.state.subscriber.items()) if k[:2] == _pair(request)]
        rows = sort_rows(rows, q.get("sortBy", ""))
    except ValueError as exc:
        return problem(400, "Bad Request", str(exc))
    pages = math.ceil(len(rows) / size)
    info = {"TotalCount": len(rows), "TotalPages": pages, "CurrentPage": page, "PageSize": size}
    data = [r.to_wire() for r in rows[(page - 1) * size : page * size]]
    return envelope(data, headers={"X-Pagination": json.dumps(info)})


def sort_rows(rows: list[SubscriberAccum], sort_by: str) -> list[SubscriberAccum]:
    """Sort by ``Field:desc,Other:asc`` (field names case-insensitive); ValueError if unknown."""
    names = {name.casefold(): name for name in SubscriberAccum.model_fields}
    specs: list[tuple[str, bool]] = []
    for part in filter(None, (p.strip() for p in sort_by.split(","))):
        name, _, direction = part.partition(":")
        field = names.get(name.strip().casefold())
        direction = direction.strip().lower() or "asc"
        if field is None or direction not in ("asc", "desc"):
            raise ValueError(f"Invalid sortBy: {part}")
        specs.append((field, direction == "desc"))
    for field, desc in reversed(specs):  # stable sorts, last key first
        rows.sort(key=_by(field), reverse=desc)
    return rows


def _by(field: str) -> Callable[[SubscriberAccum], tuple[bool, Any]]:
    def key(row: SubscriberAccum) -> tuple[bool, Any]:
        value = getattr(row, field)
        return (value is None, "" if value is None else value)

    return key


async def get_row(request: Request, sb: Sandbox) -> Response:
    """GET .../accumulators/{planYear}/{planType}/{benefitCode}; 404 if absent."""
    row = sb.state.subscriber.get(_row_key(request))
    return envelope(row.to_wire()) if row else problem(404, "Not Found", "No such SubscriberAccum")


async def update_row(request: Request, sb: Sandbox) -> Response:
    """PUT .../accumulators/{planYear}/{planType}/{benefitCode}: the full record; 404 if absent."""
    row = await _record(request, SubscriberAccum)
    if isinstance(row, Response):
        return row
    if row.key != _row_key(request):
        return problem(400, "Bad Request", "The record's key must match the path")
    previous = sb.state.subscriber.get(row.key)
    if previous is None:
        return problem(404, "Not Found", "No such SubscriberAccum")
    row = stamp(row, previous, sb.config.username)
    sb.state.put(row)
    return envelope(row.to_wire())


async def delete_row(request: Request, sb: Sandbox) -> Response:
    """DELETE .../accumulators/{planYear}/{planType}/{benefitCode}: 204; 404 if absent."""
    if not sb.state.delete(_row_key(request)):
        return problem(404, "Not Found", "No such SubscriberAccum")
    return Response(status_code=204)


async def subscriber_batch(request: Request, sb: Sandbox) -> Response:
    """PUT .../accumulators-batch: upsert each item; 207 with a status per item."""
    sid, gid = _pair(request)
    return await _batch(request, sb, SubscriberAccum, {"subscriber_ID": sid, "group_ID": gid})


async def plan_batch(request: Request, sb: Sandbox) -> Response:
    """PUT /plans/{planID}/accumulators-batch: upsert each Added Accumulator; 207."""
    return await _batch(request, sb, PlanAccumulator, {"plan_ID": request.path_params["planID"]})


async def _batch(request: Request, sb: Sandbox, model: type[W], path: dict[str, str]) -> Response:
    try:
        payload = await body_of(request)
    except ValueError:
        return problem(400, "Bad Request", "The body is not JSON")
    if not isinstance(payload, list):
        return problem(400, "Bad Request", "The body must be an array")
    items = [_upsert(sb, model, raw, path) for raw in payload]
    if sb.faults.shuffle:
        sb.rng.shuffle(items)
    aid = "activityID" if model is PlanAccumulator else "activityId"  # seed 000's spelling
    return envelope(items, status=207, media_type="text/plain", activity_key=aid)


def _upsert(sb: Sandbox, model: type[W], raw: Any, path: dict[str, str]) -> dict[str, Any]:
    """One 207 item: 200 Updated, 201 Created, 400 invalid, or an injected 500."""
    fields = raw if isinstance(raw, dict) else {}
    ident = [{"key": f, "value": fields.get(f)} for f in model.KEY]
    try:
        row = model.from_vba(fields)
    except ValidationError as exc:
        return {"id": ident, "status": 400, "body": describe(exc)}
    if any(getattr(row, f) != v for f, v in path.items()):
        return {"id": ident, "status": 400, "body": "The record's ids must match the path"}
    if sb.chance(sb.faults.item_error_rate):
        return {"id": ident, "status": 500, "body": "An error occurred while saving the entity"}
    previous = sb.state.table(model).get(row.key)
    sb.state.put(stamp(row, previous, sb.config.username))
    outcome = {"status": 200, "body": "Updated"} if previous else {"status": 201, "body": "Created"}
    return {"id": ident, **outcome}


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
        Route(ACCUMS + "-batch", r("accumulators.batch", subscriber_batch), methods=["PUT"]),
        Route(PLANS_BATCH, r("plans.batch", plan_batch), methods=["PUT"]),
    ]
