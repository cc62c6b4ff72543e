"""The sandbox's own /_admin/ endpoints: rows, adjust, faults, intrusions, journal, counters."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from decimal import Decimal
from typing import Any

from pydantic import ValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from models.buckets import VBA_FIELDS
from models.vba import PlanAccumulator, Record, SubscriberAccum
from worker.sandbox.dialect import FROM_VBA, dumps, exact_amounts, keep_digits
from worker.sandbox.emulator import Sandbox
from worker.sandbox.intrusions import Intrusion
from worker.sandbox.routes import body_of, describe
from worker.sandbox.writes import VBA_USER, with_deltas


def _json(payload: Any, status: int = 200) -> Response:
    return Response(dumps(payload), status_code=status, media_type="application/json")


async def health(request: Request, sb: Sandbox) -> Response:
    """GET /_admin/health: the sandbox answers."""
    return _json({"ok": True})


async def rows(request: Request, sb: Sandbox) -> Response:
    """GET /_admin/rows: every row, amounts as 2-decimal numbers (strict: as they were sent)."""
    subscriber = [sb.state.subscriber[k].to_wire() for k in sorted(sb.state.subscriber)]
    plans = [sb.state.plans[k].to_wire() for k in sorted(sb.state.plans)]
    return _json({"subscriber": subscriber, "plans": plans})


async def seed(request: Request, sb: Sandbox) -> Response:
    """POST /_admin/seed {subscriber: [...], plans: [...]}: rows VBA already has (0 amounts).

    A row whose key compares equal to a stored one updates it (which keeps its spelling).
    """
    payload = await body_of(request)
    zeros = dict.fromkeys(VBA_FIELDS, Decimal(0))
    raw = bool(payload.get("raw"))
    try:
        rows = payload.get("subscriber", [])
        subs = [_seeded(sb, SubscriberAccum, zeros | r, raw) for r in rows]
        plans = [_seeded(sb, PlanAccumulator, r, raw) for r in payload.get("plans", [])]
    except ValidationError as exc:
        return _json({"error": describe(exc)}, 400)
    for row in [*subs, *plans]:
        sb.put(row, "admin.seed", user=VBA_USER)
    return _json({"subscriber": len(subs), "plans": len(plans)})


def _seeded(sb: Sandbox, model: type[Record], fields: dict[str, Any], raw: bool) -> Record:
    """A seeded row: amounts must be cents in lax; strict keeps every digit. ``raw`` stores it
    unchecked (a null amount, a long string, a number as text): the odd rows a real VBA may
    hold, which a client must read without wedging."""
    if raw:
        return model.model_construct(**fields)
    if not sb.strict:
        return model.model_validate(fields)
    return keep_digits(model.model_validate(fields, context=FROM_VBA), fields)


async def adjust(request: Request, sb: Sandbox) -> Response:
    """POST /_admin/adjust {key: {5 key fields}, deltas: {field: amount}}: VBA's own claims."""
    payload = await body_of(request)
    key = tuple(str(payload["key"][f]) for f in SubscriberAccum.KEY)
    current = sb.state.get(SubscriberAccum, key)
    try:
        row = with_deltas(current, payload["key"], payload.get("deltas", {}), exact=sb.strict)
    except ValidationError as exc:
        return _json({"error": describe(exc)}, 400)
    except ValueError as exc:
        return _json({"error": str(exc)}, 400)
    row = sb.put(row, "admin.adjust", user=VBA_USER)
    return _json(row.to_wire())


async def intrude(request: Request, sb: Sandbox) -> Response:
    """GET /_admin/intrude: pending intrusions; POST: queue one (see ``Intrusion``)."""
    if request.method == "POST":
        try:
            intrusion = _intrusion(sb, await body_of(request))
        except ValidationError as exc:
            return _json({"error": describe(exc)}, 400)
        return _json(sb.intrusions.add(intrusion))
    return _json({"intrusions": [sb.intrusions.listed(i) for i in sb.intrusions.pending]})


def _intrusion(sb: Sandbox, payload: Any) -> Intrusion:
    """An intrusion: deltas must be cents in lax; strict keeps every digit."""
    if not sb.strict:
        return Intrusion.model_validate(payload)
    intrusion = Intrusion.model_validate(payload, context=FROM_VBA)
    deltas = intrusion.deltas | exact_amounts(intrusion.deltas, payload["deltas"])
    return intrusion.model_copy(update={"deltas": deltas})


async def journal(request: Request, sb: Sandbox) -> Response:
    """GET /_admin/journal?since=SEQ: every write after SEQ, oldest first (in memory only)."""
    since = int(request.query_params.get("since", "0"))
    writes = [w.to_wire() for w in sb.journal.since(since)]
    return _json({"writes": writes, "dropped": sb.journal.dropped})


async def reset(request: Request, sb: Sandbox) -> Response:
    """POST /_admin/reset: no rows, tokens, counts, writes or intrusions; the start-up faults."""
    sb.reset()
    return _json({"ok": True})


async def counters(request: Request, sb: Sandbox) -> Response:
    """GET /_admin/counters: requests per route and status."""
    return _json(sb.counts())


async def faults(request: Request, sb: Sandbox) -> Response:
    """GET or POST /_admin/faults: read or change faults; ``expire_tokens: true`` expires all."""
    if request.method == "POST":
        patch = dict(await body_of(request) or {})
        if patch.pop("expire_tokens", False):
            sb.state.expire_tokens(time.time())
        try:
            sb.faults = sb.faults.model_validate(sb.faults.model_dump() | patch)
        except ValidationError as exc:
            return _json({"error": describe(exc)}, 400)
    return JSONResponse(sb.faults.model_dump())


AdminHandler = Callable[[Request, Sandbox], Awaitable[Response]]


def _guard(sb: Sandbox, handler: AdminHandler) -> Callable[[Request], Awaitable[Response]]:
    """Admin calls need no VBA auth, only the admin token when one is configured."""

    async def endpoint(request: Request) -> Response:
        token = sb.config.admin_token
        if token and request.headers.get("x-admin-token") != token:
            return JSONResponse({"message": "Forbidden"}, status_code=403)
        try:
            return await handler(request, sb)
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            return _json({"error": f"bad admin request: {exc}"}, 400)

    return endpoint


def admin_routes(sb: Sandbox) -> list[Route]:
    """The /_admin/ routes."""
    table: list[tuple[str, AdminHandler, list[str]]] = [
        ("health", health, ["GET"]),
        ("rows", rows, ["GET"]),
        ("seed", seed, ["POST"]),
        ("adjust", adjust, ["POST"]),
        ("reset", reset, ["POST"]),
        ("counters", counters, ["GET"]),
        ("faults", faults, ["GET", "POST"]),
        ("intrude", intrude, ["GET", "POST"]),
        ("journal", journal, ["GET"]),
    ]
    return [Route(f"/_admin/{name}", _guard(sb, h), methods=m) for name, h, m in table]
