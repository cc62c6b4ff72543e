"""The sandbox's front door: gateway checks, VBA's rate limit, injected faults, counters."""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from email.utils import formatdate
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from models.vba import dumps
from worker.sandbox.config import Faults, SandboxConfig
from worker.sandbox.state import State

Handler = Callable[[Request, "Sandbox"], Awaitable[Response]]
Endpoint = Callable[[Request], Awaitable[Response]]


def envelope(
    data: Any,
    status: int = 200,
    error: dict[str, Any] | None = None,
    media_type: str = "application/json",
    headers: dict[str, str] | None = None,
    activity_key: str = "activityId",
) -> Response:
    """VBA's answer: ``{data, error, debug: {activityId}}``, amounts as 2-decimal numbers."""
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
        self.faults = config.faults.model_copy()
        self.state = State(config.state)
        self.bucket = Bucket(config.rate, config.burst)
        self.rng = random.Random(config.seed)
        self.counters: Counter[tuple[str, int]] = Counter()

    def reset(self) -> None:
        """Back to start-up: no rows, no tokens, no counts, the configured faults."""
        self.state.reset()
        self.faults = self.config.faults.model_copy()
        self.bucket = Bucket(self.config.rate, self.config.burst)
        self.counters.clear()

    def chance(self, share: float) -> bool:
        """True with probability ``share`` (seeded when the config says so)."""
        return share > 0 and self.rng.random() < share

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
        if not h.get("user-agent", "").strip():
            return JSONResponse({"message": "Forbidden"}, status_code=403)
        if not h.get("x-api-key"):
            return JSONResponse({"message": "Unauthorized"}, status_code=401)
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

    async def inject(self) -> Response | None:
        """The configured faults: latency, hangs, 429 storms, 5xx; None lets the call through."""
        f: Faults = self.faults
        if f.latency:
            await asyncio.sleep(f.latency)
        if self.chance(f.timeout_rate):
            await asyncio.sleep(f.timeout_seconds)
            return problem(504, "Gateway Timeout", "The sandbox hung on purpose")
        if self.chance(f.rate_429):
            return JSONResponse({"message": "Too Many Requests"}, 429, headers=self.retry_after())
        for status, share in ((500, f.error_500), (502, f.error_502), (503, f.error_503)):
            if self.chance(share):
                headers = self.retry_after() if status == 503 else None
                return problem(status, "Injected failure", f"sandbox fault {status}", headers)
        return None

    def route(self, label: str, handler: Handler, bearer: bool = True) -> Endpoint:
        """A VBA endpoint: gate, faults, then the handler; every answer is counted."""

        async def endpoint(request: Request) -> Response:
            response = self.gate(request, bearer) or await self.inject()
            response = response or await handler(request, self)
            self.counters[(label, response.status_code)] += 1
            return response

        return endpoint

    def counts(self) -> dict[str, Any]:
        """Requests per route and status, and per status overall."""
        by_route: dict[str, dict[str, int]] = {}
        by_status: Counter[str] = Counter()
        for (label, status), n in sorted(self.counters.items()):
            by_route.setdefault(label, {})[str(status)] = n
            by_status[str(status)] += n
        return {"total": sum(by_status.values()), "by_route": by_route, "by_status": by_status}
