"""How a VBA call fails, classified once here; nobody else inspects status codes.

::

    VbaError                  anything the VBA client raises
    ├── VbaUnavailable        retry later: 408, 429, 500, 502, 503, 504, transport errors,
    │                         timeouts; ``retry_after`` from Retry-After (seconds or HTTP date);
    │                         ``may_have_landed``: whether a write could have taken effect;
    │                         ``may_still_land``: whether it could still be taking effect
    └── VbaRejected           do not retry: any other non-2xx (status, title, detail, activity_id)
        └── VbaAuthError      login refused, or a 401 after the one token refresh

What a failed write proves depends on who answered (docs/design.md, "The settle rule"). An
answer in VBA's own envelope (or the bare ProblemDetails of its ASP.NET pipeline) carries an
activity id: VBA's side produced it, so it is done with the request, and its rows tell what
happened. Any other answer (a gateway's ``{"message": ...}``, a proxy's HTML page, an empty
body) came from something in front of VBA: a 502 or a 504 there is very often a timeout whose
upstream goes on working (IIS/ANCM 502.3, an application gateway's 502, a load balancer's idle
timeout), and some proxies answer 503 for a reset upstream. Such a write may still land, and is
settled only once the grace has passed.
"""

from __future__ import annotations

from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Final

import httpx
from pydantic import ValidationError

from models.vba import Envelope, ProblemDetails, loads

RETRYABLE: Final = frozenset({408, 429, 500, 502, 503, 504})
#: Refusals of a request that was never processed, whoever answered: a request not received in
#: full (408), a rate limit (429; VBA's is its gateway's, in front of the handler).
NOT_PROCESSED: Final = frozenset({408, 429})
#: VBA's own "unavailable": refused before its handler took the request (a proxy's 503 may
#: follow a reset upstream instead, so only VBA's own envelope proves it).
NOT_PROCESSED_BY_VBA: Final = frozenset({503})
#: Never honour a Retry-After longer than this (seconds); the caller's backoff caps it too.
RETRY_AFTER_CAP: Final = 900.0


class VbaError(Exception):
    """Base of every VBA client failure."""

    def __init__(self, message: str, *, status: int | None = None, activity_id: str | None = None):
        super().__init__(message)
        self.status = status
        self.activity_id = activity_id


class VbaUnavailable(VbaError):
    """VBA did not answer this time; try again after ``retry_after`` seconds (if it said).

    ``may_have_landed`` is False only when the request surely never reached VBA's handler
    (refused connection, a 408 or 429, VBA's own 503, a paused breaker): a timeout, a broken
    connection or any other 5xx may come after VBA wrote, so a write's outcome is then unknown
    until it is settled. ``may_still_land`` is False only when VBA's own side answered (its
    envelope, with an activity id): it is done with the request, so reading VBA's row at once
    tells what happened. After a timeout, a broken connection or any status from something in
    front of VBA (a proxy's 502 or 504 above all) the handler may still be running.
    """

    def __init__(
        self,
        message: str,
        *,
        retry_after: float | None = None,
        status: int | None = None,
        activity_id: str | None = None,
        may_have_landed: bool = True,
        may_still_land: bool = True,
    ) -> None:
        super().__init__(message, status=status, activity_id=activity_id)
        self.retry_after = retry_after
        self.may_have_landed = may_have_landed
        self.may_still_land = may_have_landed and may_still_land


class VbaRejected(VbaError):
    """VBA refused the request; repeating it unchanged will not help.

    ``may_have_landed`` is True only for a 406: ASP.NET negotiates the answer's content type
    after the action ran, so the write may have taken effect though the answer was refused.
    ``enveloped``: the answer came in VBA's own envelope (``{data, error, debug}``), which only
    VBA's handlers write; a gateway's, a proxy's or the framework's routing answer does not.
    """

    def __init__(
        self,
        status: int,
        title: str | None = None,
        detail: str | None = None,
        activity_id: str | None = None,
        enveloped: bool = False,
    ) -> None:
        text = f"VBA answered {status}: {title or 'rejected'}" + (f" ({detail})" if detail else "")
        super().__init__(text, status=status, activity_id=activity_id)
        self.title = title
        self.detail = detail
        self.enveloped = enveloped
        self.may_have_landed = status == 406

    @property
    def not_found(self) -> bool:
        """VBA's own "not found" (a 404 in its envelope): the thing asked for does not exist. A
        404 from a route, a gateway or a proxy proves nothing about VBA's rows."""
        return self.status == 404 and self.enveloped


class VbaAuthError(VbaRejected):
    """VBA refused our credentials or token, even after one refresh: fix the configuration."""


#: Refusals of the request's form, not of its records: our credentials (401), a revoked key or a
#: gateway rule (403), what we accept or send (406, 415).
NOT_THE_DATA: Final = frozenset({401, 403, 406, 415})


def refuses_data(error: VbaError) -> bool:
    """VBA refused what the request carried (a 4xx but those of :data:`NOT_THE_DATA`): splitting
    it finds the records it refuses. Anything else (an outage, our credentials, a gateway rule,
    our headers) is no fault of the records, and backs off instead."""
    return isinstance(error, VbaRejected) and error.status not in NOT_THE_DATA


def is_retryable(status: int) -> bool:
    """True for the statuses that mean "try again later"."""
    return status in RETRYABLE


def parse_retry_after(value: str | None, now: datetime | None = None) -> float | None:
    """Seconds to wait from Retry-After (delta-seconds or HTTP date), capped; None if bad."""
    if not value or not value.strip():
        return None
    text = value.strip()
    try:
        seconds = float(text)
    except ValueError:
        try:
            when = parsedate_to_datetime(text)
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        seconds = (when - (now or datetime.now(UTC))).total_seconds()
    if seconds != seconds:  # NaN
        return None
    return min(max(seconds, 0.0), RETRY_AFTER_CAP)


def envelope_of(response: httpx.Response) -> Envelope:
    """VBA's envelope from any answer, whatever its Content-Type (207s come as text/plain).

    A bare ASP.NET ProblemDetails (model binding refused the request before VBA's own code
    ran: no envelope) is read as the envelope's error, its ``traceId`` as the activity id and
    its ``errors`` (field -> messages) as the detail."""
    try:
        payload = loads(response.content) if response.content else None
    except ValueError:
        return Envelope()
    if not isinstance(payload, dict):
        return Envelope(data=payload)
    if "data" not in payload and ("errors" in payload or "traceId" in payload):
        return _bare_problem(payload)
    try:
        return Envelope.model_validate(payload)
    except ValidationError:
        return Envelope(data=payload.get("data"))


def _bare_problem(payload: dict[str, object]) -> Envelope:
    errors = payload.get("errors")
    detail = payload.get("detail")
    if isinstance(errors, dict):
        detail = "; ".join(
            f"{field}: {' '.join(map(str, m)) if isinstance(m, list) else m}"
            for field, m in errors.items()
        )
    problem = {k: payload.get(k) for k in ("type", "title", "status", "instance")}
    trace = payload.get("traceId")
    try:
        return Envelope.model_validate(
            {"error": problem | {"detail": detail}, "debug": {"activityId": trace}}
        )
    except ValidationError:
        return Envelope()


def by_vba(envelope: Envelope) -> bool:
    """Whether VBA's own side produced the answer (its envelope or ProblemDetails carries an
    activity id); a gateway's or a proxy's answer carries none."""
    return envelope.activity_id is not None


def classify(response: httpx.Response, envelope: Envelope) -> VbaError | None:
    """None for a 2xx; otherwise the one exception this answer means."""
    status = response.status_code
    if 200 <= status < 300:
        return None
    aid = envelope.activity_id
    if status in RETRYABLE:
        retry_after = parse_retry_after(response.headers.get("Retry-After"))
        from_vba = by_vba(envelope)
        unprocessed = status in NOT_PROCESSED or (from_vba and status in NOT_PROCESSED_BY_VBA)
        return VbaUnavailable(
            f"VBA answered {status}"
            if from_vba
            else f"a gateway in front of VBA answered {status}",
            retry_after=retry_after,
            status=status,
            activity_id=aid,
            may_have_landed=not unprocessed,
            may_still_land=not from_vba,
        )
    problem = envelope.error or ProblemDetails()
    title = problem.title or _gateway_message(response)
    return VbaRejected(status, title, problem.detail, aid, enveloped=_enveloped(response))


def _enveloped(response: httpx.Response) -> bool:
    """The answer is VBA's envelope: an object with ``error`` and ``debug`` (its activity id)."""
    try:
        payload = loads(response.content) if response.content else None
    except ValueError:
        return False
    if not isinstance(payload, dict) or "error" not in payload:
        return False
    debug = payload.get("debug")
    return isinstance(debug, dict) and any(
        isinstance(debug.get(k), str) for k in ("activityId", "activityID")
    )


def _gateway_message(response: httpx.Response) -> str | None:
    """AWS API Gateway answers ``{"message": "Forbidden"}`` before VBA sees the call."""
    try:
        payload = response.json()
    except ValueError:
        return None
    message = payload.get("message") if isinstance(payload, dict) else None
    return message if isinstance(message, str) else None
