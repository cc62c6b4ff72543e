"""The sandbox's front door: gateway checks, VBA's rate limit, injected faults, counters."""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from email.utils import formatdate
from typing import Any, Final, Literal, TypeVar, cast

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.types import Receive, Scope, Send

from models.vba import SUBSCRIBER_KEY, Record, SubscriberAccum
from worker.sandbox.config import Faults, SandboxConfig
from worker.sandbox.dialect import (
    CAMEL,
    acceptable,
    collate,
    collate_text,
    dumps,
    exact,
    keep_digits,
)
from worker.sandbox.intrusions import After, Intrusions
from worker.sandbox.state import Key, State
from worker.sandbox.writes import VBA_USER, Journal, Write, stamp, with_deltas

Handler = Callable[[Request, "Sandbox"], Awaitable[Response]]
Endpoint = Callable[[Request], Awaitable[Response]]
W = TypeVar("W", bound=Record)
Countdown = Literal["lost_answers", "item_written_errors", "late_answers", "list_gateway_404s"]
#: What a gateway in front of VBA says when it gives up on VBA (AWS API Gateway's words): no
#: VBA envelope, no activity id.
GATEWAY: Final = {502: "Internal server error", 504: "Endpoint request timed out"}

#: The status a reset answer is counted under: the client got no status at all.
RESET: Final = 0


def envelope(
    data: Any,
    status: int = 200,
    error: dict[str, Any] | None = None,
    media_type: str = "application/json",
    headers: dict[str, str] | None = None,
    activity_key: str = "activityId",
) -> Response:
    """VBA's answer: ``{data, error, debug: {activityId}}``, amounts as 2-decimal numbers.

    (An amount strict stored with more decimals keeps them: see dialect.dumps.)
    """
    body = {"data": data, "error": error, "debug": {activity_key: str(uuid.uuid4())}}
    return Response(dumps(body), status_code=status, media_type=media_type, headers=headers)


def problem(
    status: int, title: str, detail: str | None = None, headers: dict[str, str] | None = None
) -> Response:
    """An error answer in VBA's envelope with RFC 7807 problem details."""
    error = {
        "type": f"https://httpstatuses.io/{status}",
        "title": title,
        "status": status,
        "detail": detail,
        "instance": None,
    }
    return envelope(None, status=status, error=error, headers=headers)


def gateway(status: int) -> Response:
    """A gateway's own answer in front of VBA (502, 504): its words, no VBA envelope."""
    return JSONResponse({"message": GATEWAY[status]}, status_code=status)


class Reset(Response):
    """Half of ``answer`` under its full Content-Length, then the connection closes.

    ASGI has no "abort"; uvicorn closes the connection when the app returns mid-body (and logs
    "ASGI callable returned without completing response."), so the client reads a short body:
    httpx raises RemoteProtocolError, a TransportError.
    """

    def __init__(self, answer: Response) -> None:
        super().__init__(bytes(answer.body), answer.status_code)
        self.raw_headers = answer.raw_headers

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        start = {"type": "http.response.start", "status": self.status_code}
        await send(start | {"headers": self.raw_headers})
        half = bytes(self.body[: len(self.body) // 2])
        await send({"type": "http.response.body", "body": half, "more_body": True})


def writes_of(request: Request) -> list[Write]:
    """The journal entries a VBA call made, so its answer's fate can be written on them."""
    return cast(list[Write], request.scope.setdefault("sandbox.writes", []))


class Bucket:
    """VBA's token bucket as the server sees it: a call without a token is refused."""

    def __init__(self, rate: float, burst: int) -> None:
        self.rate, self.burst = rate, float(burst)
        self.tokens, self.ts = float(burst), time.monotonic()

    def take(self) -> float:
        """0 when a token was taken; otherwise the seconds until one is due."""
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.ts) * self.rate)
        self.ts = now
        if self.tokens >= 1:
            self.tokens -= 1
            return 0.0
        return (1 - self.tokens) / self.rate


class Sandbox:
    """The emulator's state and policies, shared by every route."""

    def __init__(self, config: SandboxConfig) -> None:
        self.config = config
        self.strict = config.dialect == "strict"
        self.fold = collate if self.strict else exact
        self.faults = config.faults.model_copy()
        self.state = State(config.state, self.fold)
        self.bucket = Bucket(config.rate, config.burst)
        self.rng = random.Random(config.seed)
        # Its own dice, so strict's shuffled lists leave the fault dice's sequence alone.
        self.order_rng = random.Random(config.seed)
        self.counters: Counter[tuple[str, int]] = Counter()
        self.journal = Journal()
        self.intrusions = Intrusions(self.fold)
        self.landing: set[asyncio.Task[None]] = set()  # late calls VBA is still working on
        #: Batch calls in flight by path (one pair's, or one plan's), and how many calls began
        #: while another for the same path was in flight: a flush's fence says never.
        self.in_flight: Counter[str] = Counter()
        self.overlapping = 0

    def reset(self) -> None:
        """Back to start-up: no rows, tokens, counts, writes or intrusions; the start-up faults."""
        for task in self.landing:
            task.cancel()
        self.landing.clear()
        self.state.reset()
        self.faults = self.config.faults.model_copy()
        self.bucket = Bucket(self.config.rate, self.config.burst)
        self.counters.clear()
        self.overlapping = 0
        self.journal.clear()
        self.intrusions.clear()

    def put(
        self,
        row: W,
        op: str,
        *,
        user: str | None = None,
        status: int = 200,
        call: Request | None = None,
    ) -> W:
        """Stamp, store and journal a write (``user``: the API user); ``call``: the VBA call.

        A row keeps the key spelling it was created with (strict finds it by another).
        """
        user = user or self.config.username
        previous = self.state.get(type(row), row.key)
        if previous is not None:
            row = row.model_copy(update={f: getattr(previous, f) for f in row.KEY})
        if call is None:  # VBA's own write (seed, adjust, intrusion): VBA's user, whatever it held
            row = row.model_copy(update={"update_User": None})
        row = stamp(row, previous, user)
        self.state.put(row)
        self._journal(self.journal.record(op, user, previous, row, status), call)
        return row

    def delete(self, key: Key, call: Request) -> bool:
        """Delete and journal a subscriber row; False when there was none."""
        previous = self.state.get(SubscriberAccum, key)
        if previous is None:
            return False
        self.state.delete(key)
        write = self.journal.record(
            "accumulators.delete", self.config.username, previous, None, 204
        )
        self._journal(write, call)
        return True

    def _journal(self, write: Write, call: Request | None) -> None:
        if call is not None:
            writes_of(call).append(write)

    def intrude(self, after: After, pair: tuple[str, str], touched: list[Key]) -> None:
        """VBA's own writes waiting for this call: ``deltas`` added to their rows, as VBA."""
        for intrusion in self.intrusions.due(after, pair):
            for key in intrusion.rows(touched):
                current = self.state.get(SubscriberAccum, key)
                key_fields = dict(zip(SUBSCRIBER_KEY, key, strict=True))
                row = with_deltas(current, key_fields, intrusion.deltas, exact=self.strict)
                self.put(row, "intrusion", user=VBA_USER)

    def same(self, a: Key, b: Key) -> bool:
        """Whether two keys (or parts of keys) name the same row, as this dialect compares."""
        return self.fold(a) == self.fold(b)

    def text_order(self, text: str) -> str:
        """The sort key of a string field: strict sorts as SQL Server's collation."""
        return collate_text(text) if self.strict else text

    def parse(self, model: type[W], payload: dict[str, Any]) -> W:
        """A row from a write's body: lax rounds amounts to cents, strict keeps every digit."""
        row = model.from_vba(payload)
        return keep_digits(row, payload) if self.strict else row

    def ident(self, model: type[Record], values: Sequence[Any]) -> list[dict[str, Any]]:
        """A 207 item's ``id``: the key's names as ``id_spelling`` says, with ``values``."""
        camel = self.config.id_spelling == "camel"
        names = (CAMEL[f] if camel else f for f in model.KEY)
        return [{"key": n, "value": v} for n, v in zip(names, values, strict=True)]

    def chance(self, share: float) -> bool:
        """True with probability ``share`` (seeded when the config says so)."""
        return share > 0 and self.rng.random() < share

    def fires(self, countdown: Countdown, share: float) -> bool:
        """A countdown fault fires (and is spent) while above 0; after that, the dice decide."""
        left: int = getattr(self.faults, countdown)
        if left > 0:
            setattr(self.faults, countdown, left - 1)
            return True
        return self.chance(share)

    def list_wait(self) -> float:
        """Seconds this list call waits before reading its rows; spends one of ``slow_lists``."""
        f = self.faults
        if f.list_delay <= 0 or f.slow_lists == 0:
            return 0.0
        if f.slow_lists is not None:
            f.slow_lists -= 1
        return f.list_delay

    def retry_after(self) -> dict[str, str]:
        """The Retry-After header the faults ask for, as seconds or as an HTTP date."""
        seconds = self.faults.retry_after
        if self.faults.retry_after_date:
            return {"Retry-After": formatdate(time.time() + seconds, usegmt=True)}
        return {"Retry-After": f"{seconds:g}"}

    def gate(self, request: Request, bearer: bool) -> Response | None:
        """What API Gateway and VBA check before a handler runs; None lets the call through."""
        h = request.headers
        if self.faults.down:
            return problem(503, "Service Unavailable", "VBA is down", self.retry_after())
        if self.faults.forbidden or not h.get("user-agent", "").strip():
            return JSONResponse({"message": "Forbidden"}, status_code=403)
        if not h.get("x-api-key"):
            # API Gateway answers 403 to a missing key too; lax keeps the 401 our client knew.
            status, message = (403, "Forbidden") if self.strict else (401, "Unauthorized")
            return JSONResponse({"message": message}, status_code=status)
        if h["x-api-key"] != self.config.api_key:
            return JSONResponse({"message": "Forbidden"}, status_code=403)
        wait = self.bucket.take()
        if wait > 0:
            headers = {"Retry-After": f"{max(1, round(wait + 0.5))}"}
            return JSONResponse({"message": "Too Many Requests"}, 429, headers=headers)
        if not h.get("vbasoftware-database"):
            return problem(400, "Bad Request", "The vbasoftware-database header is required")
        if h["vbasoftware-database"] != self.config.database:
            return problem(400, "Bad Request", "Unknown vbasoftware-database")
        return self._bearer(request) if bearer else None

    def _bearer(self, request: Request) -> Response | None:
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        expires_at = self.state.id_tokens.get(token) if scheme.lower() == "bearer" else None
        if expires_at is None:
            return problem(401, "Unauthorized", "A valid bearer token is required")
        if expires_at <= time.time():
            return problem(401, "Unauthorized", "The token has expired")
        return None

    def negotiate(self, request: Request, media_type: str) -> Response | None:
        """Strict: 406 when an Accept header admits neither ``media_type`` nor ``*/*``."""
        if not self.strict or acceptable(request.headers.get("accept"), media_type):
            return None
        detail = f"The Accept header admits neither {media_type} nor */*"
        return problem(406, "Not Acceptable", detail)

    async def inject(self) -> Response | None:
        """The configured faults: latency, hangs, 429 storms, 5xx; None lets the call through."""
        f: Faults = self.faults
        if f.latency:
            await asyncio.sleep(f.latency)
        if self.chance(f.timeout_rate):
            await asyncio.sleep(f.timeout_seconds)
            return gateway(504)  # the gateway gave up on VBA, which may go on
        if self.chance(f.rate_429):
            return JSONResponse({"message": "Too Many Requests"}, 429, headers=self.retry_after())
        for status, share in ((500, f.error_500), (502, f.error_502), (503, f.error_503)):
            if self.chance(share):
                headers = self.retry_after() if status == 503 else None
                return problem(status, "Injected failure", f"sandbox fault {status}", headers)
        return None

    def route(
        self, label: str, handler: Handler, bearer: bool = True, batch: bool = False
    ) -> Endpoint:
        """A VBA endpoint: gate, faults, the handler, then (a batch) maybe a lost answer.

        Every answer is counted under the status the client got: a lost answer under 504, or
        under :data:`RESET` (0) when the connection was reset.
        """
        media_type = "text/plain" if batch else "application/json"  # seed 000: a 207 is text

        async def endpoint(request: Request) -> Response:
            if not batch:
                return await answer(request)
            path = request.url.path
            self.overlapping += self.in_flight[path] > 0
            self.in_flight[path] += 1
            try:
                return await answer(request)
            finally:
                self.in_flight[path] -= 1

        async def answer(request: Request) -> Response:
            response = self.gate(request, bearer) or self.negotiate(request, media_type)
            response = response or await self.inject()
            if response is None and batch and self.fires("late_answers", self.faults.late_rate):
                response = await self.land_later(request, handler)
            response = response or await handler(request, self)
            applied = batch and response.status_code == 207  # only a written batch loses it
            if applied and self.fires("lost_answers", self.faults.lost_answer_rate):
                return await self.lose(request, label, response)
            self.counters[(label, response.status_code)] += 1
            return response

        return endpoint

    async def land_later(self, request: Request, handler: Handler) -> Response:
        """A gateway answers 502 or 504 at once while VBA goes on with the call: its writes land
        ``late_seconds`` later (or, ``late_never``, not at all), their answer lost."""
        await request.body()  # read now: the handler runs after the answer has gone
        if not self.chance(self.faults.late_never):
            task = asyncio.create_task(self._land(request, handler, self.faults.late_seconds))
            self.landing.add(task)
            task.add_done_callback(self.landing.discard)
        how = self.faults.late_status
        return gateway(self.rng.choice((502, 504)) if how == "either" else int(how))

    async def _land(self, request: Request, handler: Handler, delay: float) -> None:
        await asyncio.sleep(delay)
        await handler(request, self)
        for write in writes_of(request):
            write.answered = False

    def gateway_404(self) -> Response | None:
        """The list's gateway fault: a 404 from a route or a gateway, not VBA's "not found"."""
        if not self.fires("list_gateway_404s", self.faults.list_gateway_404_rate):
            return None
        return JSONResponse({"message": "Not Found"}, status_code=404)

    async def lose(self, request: Request, label: str, answer: Response) -> Response:
        """The batch is written; its answer is lost: a 504, a reset, or a hang then a 504."""
        for write in writes_of(request):
            write.answered = False
        how, hang = self.faults.lost_answer, self.faults.timeout_seconds
        # Counted before a hang, so a test sees it while the call still hangs.
        self.counters[(label, RESET if how == "reset" else 504)] += 1
        if how == "reset":
            return Reset(answer)
        if how == "hang":
            await asyncio.sleep(hang)
        return gateway(504)

    def counts(self) -> dict[str, Any]:
        """Requests per route and status, and per status overall (0: connection reset)."""
        by_route: dict[str, dict[str, int]] = {}
        by_status: Counter[str] = Counter()
        for (label, status), n in sorted(self.counters.items()):
            by_route.setdefault(label, {})[str(status)] = n
            by_status[str(status)] += n
        return {
            "total": sum(by_status.values()),
            "by_route": by_route,
            "by_status": by_status,
            "overlapping_batches": self.overlapping,
        }
