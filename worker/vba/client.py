"""The VBAPI client: every seed endpoint, validated payloads, shared token and rate limit."""

from __future__ import annotations

import json
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from importlib.metadata import PackageNotFoundError, version
from types import TracebackType
from typing import Any, Final
from urllib.parse import quote

import httpx
from pydantic import ValidationError
from redis import Redis

from models.events import canon
from models.vba import (
    PLAN_KEY,
    SUBSCRIBER_KEY,
    BatchItemWire,
    Envelope,
    PlanAccumulator,
    RemoteAccum,
    SubscriberAccum,
    dumps,
)
from worker.logs import Log
from worker.settings import NotConfigured, Settings
from worker.vba.auth import (
    STATUS_EVENTS,
    Authenticator,
    LocalTokenStore,
    RedisTokenStore,
    TokenStore,
    store_prefix,
)
from worker.vba.breaker import PAUSE_CAP, Breaker, LocalBreaker, RedisBreaker, check
from worker.vba.errors import VbaAuthError, VbaRejected, VbaUnavailable, classify, envelope_of
from worker.vba.ratelimit import LocalBucket, RateLimiter, RedisBucket, client_burst
from worker.vba.results import BatchItem, BatchResult, Page
from worker.vba.storeshared import StoreBucket, StoreTokenStore


def _version() -> str:
    try:
        return version("accumsync")
    except PackageNotFoundError:  # a checkout that was not pip-installed
        return "0.1.0"


VERSION: Final = _version()
USER_AGENT: Final = f"accumsync/{VERSION}"
CONNECT_RETRY_DELAY = 0.25
#: Non-2xx answers that are part of the protocol, not trouble: logged at info, not warning.
#: (VBA's own, in its envelope: a 404 from anything else is trouble.)
EXPECTED: Final = frozenset({("accumulators.list", 404)})  # a subscriber VBA doesn't know yet
STALE_PREPAID = 1.0  # seconds past due after which a prepaid token is dropped, not spent
#: Transport errors raised before a request's bytes could reach VBA.
NEVER_SENT: Final = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)
REDIS_TIMEOUT = 5.0  # seconds: the shared token, bucket and breaker answer in milliseconds

log = Log("vba.client")

SubscriberRecord = SubscriberAccum | Mapping[str, Any]
BeforeSend = Callable[[], None]
PlanRecord = PlanAccumulator | Mapping[str, Any]


class VbaClient:
    """Synchronous VBAPI client; ``transport`` is the test seam, ``redis`` shares token and bucket.

    Raises :class:`~worker.vba.errors.VbaError` subclasses only (and pydantic's ValidationError
    for a record that fails the wire model: it is never sent).
    """

    def __init__(
        self,
        settings: Settings,
        transport: httpx.BaseTransport | None = None,
        redis: Redis | None = None,
        on_event: Callable[[str], None] = lambda _: None,
        in_store: bool = False,
    ) -> None:
        """``in_store``: without Redis, share the rate-limit bucket and the token with the
        fleet's other processes through the store (the embedded defaults' ``-c N``), not
        within this process only."""
        if not settings.vba_base_url:
            raise NotConfigured(
                "ACCUMSYNC_VBA_BASE_URL is not set: VBA's API address (https://...)"
            )
        self.settings = settings
        self.http = httpx.Client(
            base_url=settings.vba_base_url,
            transport=transport,
            timeout=settings.vba_timeout,
            # No pool wait before a request leaves: Settings.request_worst_case counts none.
            limits=httpx.Limits(max_connections=None, max_keepalive_connections=20),
            verify=settings.vba_verify_tls,
            headers={"User-Agent": USER_AGENT},
        )
        url = settings.effective_redis_url
        self.redis = redis if redis is not None else (shared_redis(url) if url else None)
        self.in_store = in_store and self.redis is None
        self.limiter = self._limiter()
        self._local = threading.local()
        self.breaker = self._breaker()
        self.on_event = on_event
        self.auth = Authenticator(
            settings, self.http, self._tokens(), self.limiter, on_event=on_event
        )

    def _tokens(self) -> TokenStore:
        prefix = store_prefix(self.settings)
        if self.redis is not None:
            return RedisTokenStore(self.redis, prefix)
        return StoreTokenStore(prefix) if self.in_store else LocalTokenStore()

    def _limiter(self) -> RateLimiter:
        s, burst = self.settings, client_burst(self.settings.vba_burst)
        if self.in_store:
            return StoreBucket(rate_key(s), s.vba_rate, burst)
        if self.redis is None:
            return LocalBucket(s.vba_rate, burst)
        return RedisBucket(self.redis, rate_key(s), s.vba_rate, burst)

    def _breaker(self) -> Breaker:
        s = self.settings
        args = (s.vba_breaker_threshold, s.backoff_base, min(s.backoff_max, PAUSE_CAP))
        probe_ttl = s.vba_timeout + 1
        if self.redis is None:
            return LocalBreaker(*args, probe_ttl=probe_ttl)
        return RedisBreaker(self.redis, rate_key(s).removesuffix(":rate"), *args, probe_ttl)

    def prepay(self, calls: int) -> None:
        """This thread's next request takes its rate-limit token together with the tokens of
        the ``calls - 1`` requests after it; each of those then waits only until its own token
        is due. A shared-mode flush takes its read's and its PUT's together, so after the read
        the PUT does not queue behind other processes' calls: the read-to-write window (a VBA
        write landing in it is overwritten) stays short. The tokens are taken only when the
        read really leaves (past the breaker), so a paused fleet wastes none.
        """
        local = self._local.__dict__
        local["due"] = deque()  # a token an earlier flush left unspent is dropped, never spent
        local["extra"] = calls - 1

    def _take_token(self) -> None:
        """This request's token: a prepaid one (waiting until it is due), else a new one, with
        the tokens :meth:`prepay` asked to take along. A prepaid token left unused for long is
        dropped: spending it late could exceed the rate."""
        local = self._local.__dict__
        due: deque[float] = local.setdefault("due", deque())
        while due:
            late = time.monotonic() - due.popleft()
            if late <= STALE_PREPAID:
                if late < 0:
                    time.sleep(-late)
                return
        extra, local["extra"] = local.get("extra", 0), 0
        now = time.monotonic()
        due.extend(now + self.limiter.reserve() for _ in range(extra))
        self.limiter.acquire()

    def paused(self) -> float:
        """Seconds VBA calls stay paused fleet-wide (0: calls may go), without probing."""
        return self.breaker.remaining()

    def close(self) -> None:
        """Close the HTTP connections."""
        self.http.close()

    def __enter__(self) -> VbaClient:
        return self

    def __exit__(
        self, exc: type[BaseException] | None, val: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # -- subscriber accumulators ------------------------------------------------------------

    def create_accumulator(self, record: SubscriberRecord) -> SubscriberAccum | None:
        """POST /subscribers/{id}/groups/{id}/accumulators; VBA's copy of the new row."""
        row = sendable(subscriber_accum(record))
        path = _path("subscribers", row.subscriber_ID, "groups", row.group_ID, "accumulators")
        envelope = self._call("POST", path, "accumulators.create", body=dumps(row.to_request()))
        return _row(envelope.data)

    def list_accumulators(
        self,
        subscriber_id: str,
        group_id: str,
        page: int = 1,
        page_size: int = 100,
        sort_by: str | None = None,
    ) -> Page:
        """GET /subscribers/{id}/groups/{id}/accumulators: one page, with X-Pagination.

        Rows are read leniently (``RemoteAccum``); one whose money can't be read is listed in
        ``Page.unreadable``. VBA's own 404 (its envelope: it does not know the subscriber yet)
        is an empty page: there is no row to keep, and a write for it is then created or
        refused by VBA. Any other 404 (a route, a gateway, a proxy) proves nothing about VBA's
        rows and is raised, like any refusal: never read absence into it.
        """
        params: dict[str, str | int] = {"page": page, "pageSize": page_size}
        if sort_by:
            params["sortBy"] = sort_by
        path = _path("subscribers", subscriber_id, "groups", group_id, "accumulators")
        try:
            response, envelope = self._request("GET", path, "accumulators.list", params=params)
        except VbaRejected as exc:
            if not exc.not_found:
                raise
            log.info("vba.list_not_found", activity_id=exc.activity_id)
            return Page([], page, page_size, 0, 1)
        rows = envelope.data if isinstance(envelope.data, list) else []
        page_ = _page(response.headers.get("X-Pagination"), page, page_size)
        for raw in rows:
            _read_row(raw, page_)
        return page_

    def iter_accumulators(
        self, subscriber_id: str, group_id: str, page_size: int = 100, sort_by: str | None = None
    ) -> Iterator[RemoteAccum]:
        """Every readable accumulator of the pair, page after page."""
        for result in self.pages(subscriber_id, group_id, page_size, sort_by):
            yield from result.items

    def pages(
        self,
        subscriber_id: str,
        group_id: str,
        page_size: int = 100,
        sort_by: str | None = None,
        before_page: Callable[[], object] | None = None,
    ) -> Iterator[Page]:
        """Every page of the pair's accumulators (with the rows that could not be read);
        ``before_page`` runs before each request (a caller's own rate share)."""
        page = 1
        while True:
            if before_page is not None:
                before_page()
            result = self.list_accumulators(subscriber_id, group_id, page, page_size, sort_by)
            yield result
            if not (result.items or result.unreadable) or not result.has_next:
                return
            page += 1

    def get_accumulator(
        self, subscriber_id: str, group_id: str, plan_year: str, plan_type: str, benefit_code: str
    ) -> SubscriberAccum:
        """GET .../accumulators/{planYear}/{planType}/{benefitCode}; VbaRejected(404) if absent."""
        key = (subscriber_id, group_id, plan_year, plan_type, benefit_code)
        envelope = self._call("GET", _row_path(key), "accumulators.get")
        row = _row(envelope.data)
        if row is None:
            raise VbaUnavailable("VBA answered without a row", activity_id=envelope.activity_id)
        return row

    def update_accumulator(self, record: SubscriberRecord) -> SubscriberAccum | None:
        """PUT .../accumulators/{planYear}/{planType}/{benefitCode} with the full record."""
        row = sendable(subscriber_accum(record))
        body = dumps(row.to_request())
        envelope = self._call("PUT", _row_path(row.key), "accumulators.update", body=body)
        return _row(envelope.data)

    def delete_accumulator(
        self, subscriber_id: str, group_id: str, plan_year: str, plan_type: str, benefit_code: str
    ) -> None:
        """DELETE .../accumulators/{planYear}/{planType}/{benefitCode} (204)."""
        key = (subscriber_id, group_id, plan_year, plan_type, benefit_code)
        self._call("DELETE", _row_path(key), "accumulators.delete")

    def upsert_accumulators(
        self,
        subscriber_id: str,
        group_id: str,
        records: Sequence[SubscriberRecord],
        before_send: BeforeSend | None = None,
    ) -> BatchResult:
        """PUT .../accumulators-batch: create or update up to ``vba_batch_max`` rows (207).

        ``before_send`` runs right before each time the request leaves (after the rate limiter):
        the flush records its intent and checks its lease there; if it raises, nothing is sent.
        """
        rows = [sendable(subscriber_accum(r)) for r in records]
        for row in rows:
            if (canon(row.subscriber_ID), canon(row.group_ID)) != (
                canon(subscriber_id),
                canon(group_id),
            ):
                raise ValueError("a record's subscriber_ID/group_ID differs from the batch's")
        path = _path("subscribers", subscriber_id, "groups", group_id, "accumulators-batch")
        payload = [r.to_request() for r in rows]
        in_path = {"subscriber_ID": subscriber_id, "group_ID": group_id}
        return self._batch(
            path, "accumulators.batch", payload, SUBSCRIBER_KEY, before_send, in_path
        )

    # -- plan accumulators ----------------------------------------------------------------

    def upsert_plan_accumulators(self, plan_id: str, records: Sequence[PlanRecord]) -> BatchResult:
        """PUT /plans/{planID}/accumulators-batch: create or update a plan's Added Accumulators."""
        rows = [plan_accumulator(r) for r in records]
        if any(row.plan_ID != plan_id for row in rows):
            raise ValueError("a record's plan_ID differs from the batch's")
        path = _path("plans", plan_id, "accumulators-batch")
        payload = [r.to_request() for r in rows]
        return self._batch(path, "plans.batch", payload, PLAN_KEY, path_key={"plan_ID": plan_id})

    # -- plumbing ---------------------------------------------------------------------------

    def _batch(
        self,
        path: str,
        op: str,
        payload: list[dict[str, Any]],
        key_fields: tuple[str, ...],
        before_send: BeforeSend | None = None,
        path_key: Mapping[str, str] | None = None,
    ) -> BatchResult:
        if len(payload) > self.settings.vba_batch_max:
            raise ValueError(f"{len(payload)} records exceed vba_batch_max; send them in chunks")
        if not payload:
            return BatchResult((), key_fields, None, path_key)
        _, envelope = self._request("PUT", path, op, body=dumps(payload), before_send=before_send)
        if not isinstance(envelope.data, list):  # every item's outcome is unknown: settle them
            log.warning("vba.batch_without_items", op=op, activity_id=envelope.activity_id)
        data = envelope.data if isinstance(envelope.data, list) else []
        result = BatchResult(_items(data), key_fields, envelope.activity_id, path_key)
        failed = sum(not item.ok for item in result.items)
        log.info(
            "vba.batch",
            op=op,
            sent=len(payload),
            items=len(result),
            failed=failed,
            activity_id=envelope.activity_id,
        )
        return result

    def _call(self, method: str, path: str, op: str, body: str | None = None) -> Envelope:
        return self._request(method, path, op, body=body)[1]

    def _request(
        self,
        method: str,
        path: str,
        op: str,
        params: Mapping[str, str | int] | None = None,
        body: str | None = None,
        before_send: BeforeSend | None = None,
    ) -> tuple[httpx.Response, Envelope]:
        """One call: breaker, token, rate limit, one renewal after a 401, classify the answer."""
        check(self.breaker)
        try:
            response, envelope = self._attempt(method, path, op, params, body, before_send)
        except VbaUnavailable as exc:
            paused = self.breaker.failed(exc.retry_after)
            if paused > 0:
                log.warning("vba.paused", op=op, pause_s=round(paused, 1), status=exc.status)
            raise
        except VbaRejected as exc:
            self._refused(op, exc)
            raise
        self.breaker.succeeded()
        return response, envelope

    def _refused(self, op: str, exc: VbaRejected) -> None:
        """VBA answered, refusing: it is up. A 403 is configuration (a revoked or wrong key, a
        gateway rule, no User-Agent): no call of ours will pass, so every process pauses."""
        if exc.status != 403:
            self.breaker.succeeded()
            return
        pause = self.breaker.failed(min(self.settings.backoff_max, PAUSE_CAP))
        log.error(
            "vba.forbidden",
            op=op,
            status=403,
            pause_s=round(pause, 1),
            activity_id=exc.activity_id,
            reason="VBA or its gateway refused us: check ACCUMSYNC_VBA_API_KEY, "
            "the database, and the gateway's rules",
        )

    def _attempt(
        self,
        method: str,
        path: str,
        op: str,
        params: Mapping[str, str | int] | None,
        body: str | None,
        before_send: BeforeSend | None,
    ) -> tuple[httpx.Response, Envelope]:
        token = self.auth.token()
        request = (method, path, op, params, body)
        response = self._send(*request, token, before_send)
        if response.status_code == 401:
            self.on_event("vba_401")
            aid = envelope_of(response).activity_id
            log.warning("vba.unauthorized_refreshing", op=op, activity_id=aid)
            response = self._send(*request, self.auth.renew(stale=token), before_send)
            if response.status_code == 401:
                self.on_event("vba_401")
                aid = envelope_of(response).activity_id
                log.error("vba.unauthorized_after_refresh", op=op, status=401, activity_id=aid)
                raise VbaAuthError(401, "Unauthorized after a token refresh", None, aid)
        envelope = envelope_of(response)
        error = classify(response, envelope)
        if error is not None:
            retry_after = getattr(error, "retry_after", None)
            if (counted := STATUS_EVENTS.get(response.status_code)) is not None:
                self.on_event(counted)
            expected = (op, response.status_code) in EXPECTED and getattr(error, "enveloped", False)
            emit = log.info if expected else log.warning
            emit(
                "vba.call_failed",
                op=op,
                status=response.status_code,
                retry_after=retry_after,
                activity_id=error.activity_id,
            )
            raise error
        log.debug("vba.call", op=op, status=response.status_code, activity_id=envelope.activity_id)
        return response, envelope

    def _send(
        self,
        method: str,
        path: str,
        op: str,
        params: Mapping[str, str | int] | None,
        body: str | None,
        token: str,
        before_send: BeforeSend | None = None,
    ) -> httpx.Response:
        """Send; one quick retry of a refused connection only (longer waits are the caller's)."""
        headers = self._headers(token, body is not None)
        for attempt in (1, 2):
            self._take_token()
            if before_send is not None:
                before_send()
            try:
                return self.http.request(method, path, params=params, content=body, headers=headers)
            except httpx.ConnectError as exc:
                if attempt == 1:
                    log.info("vba.connect_retry", op=op, error=type(exc).__name__)
                    time.sleep(CONNECT_RETRY_DELAY)
                    continue
                error: httpx.TransportError = exc
            except httpx.TransportError as exc:
                error = exc
            log.warning("vba.unreachable", op=op, error=type(error).__name__)
            raise VbaUnavailable(
                f"VBA unreachable: {type(error).__name__}",
                may_have_landed=not isinstance(error, NEVER_SENT),
            ) from error
        raise AssertionError("unreachable")  # pragma: no cover

    def _headers(self, token: str, has_body: bool) -> dict[str, str]:
        headers = {
            "x-api-key": self.settings.vba_api_key.get_secret_value(),
            "Authorization": f"Bearer {token}",
            "vbasoftware-database": self.settings.vba_database,
            "Accept": "application/json, text/plain",  # seed 000's 207 is text/plain
        }
        if has_body:
            headers["Content-Type"] = "application/json"
        return headers


def shared_redis(url: str) -> Redis:
    """The Redis holding the token, the bucket and the breaker; a silent link fails in seconds.

    Without timeouts a partitioned connection hangs the flush task (and its pool slot) forever.
    """
    return Redis.from_url(
        url,
        socket_timeout=REDIS_TIMEOUT,
        socket_connect_timeout=REDIS_TIMEOUT,
        socket_keepalive=True,
        health_check_interval=30,
    )


def subscriber_accum(record: SubscriberRecord) -> SubscriberAccum:
    """The record as a validated wire model (ValidationError when it breaks a seed rule)."""
    return record if isinstance(record, SubscriberAccum) else SubscriberAccum.model_validate(record)


def plan_accumulator(record: PlanRecord) -> PlanAccumulator:
    """The plan record as a validated wire model (ValidationError when it breaks a seed rule)."""
    return record if isinstance(record, PlanAccumulator) else PlanAccumulator.model_validate(record)


def rate_key(settings: Settings) -> str:
    """VBA's bucket is per API key: one Redis bucket per (VBA, key), the key itself hashed."""
    account = settings.model_copy(update={"vba_username": "", "vba_database": ""})
    return store_prefix(account) + ":rate"


def _path(*parts: str) -> str:
    return "/" + "/".join(quote(p, safe="") if i % 2 else p for i, p in enumerate(parts))


def _row_path(key: Sequence[str]) -> str:
    sub, group, year, ptype, code = key
    tail = "/".join(quote(v, safe="") for v in (year, ptype, code))
    return _path("subscribers", sub, "groups", group, "accumulators") + "/" + tail


def _row(data: Any) -> SubscriberAccum | None:
    return SubscriberAccum.from_vba(data) if isinstance(data, dict) else None


def sendable(row: SubscriberAccum) -> SubscriberAccum:
    """The row, if it may leave: no amount below zero (VBA would count it as money)."""
    negative = [f for f, a in row.amounts().items() if a < 0]
    if negative:
        raise ValueError(f"never sent: negative amounts for {', '.join(negative)}")
    return row


def _read_row(raw: Any, page: Page) -> None:
    """One listed row into the page: read leniently, or noted as unreadable with why."""
    if not isinstance(raw, dict):
        page.unreadable.append((None, f"a row that is not an object: {type(raw).__name__}"))
        return
    try:
        page.items.append(RemoteAccum.from_vba(raw))
    except (ValueError, ValidationError) as exc:
        key = tuple(str(raw.get(f, "")) for f in SUBSCRIBER_KEY)
        why = exc.errors()[0]["msg"] if isinstance(exc, ValidationError) else str(exc)
        page.unreadable.append((key if all(key) else None, why))


def _items(data: list[Any]) -> Iterator[BatchItem]:
    for raw in data:
        try:
            item = BatchItemWire.model_validate(raw)
        except ValidationError:
            log.warning("vba.batch_item_unparsed")
            continue
        yield BatchItem(item.key(), item.status, item.body or "")


def _page(header: str | None, page: int, size: int) -> Page:
    """An empty Page with the figures of X-Pagination (JSON); missing or bad header: unknown."""
    try:
        info = json.loads(header) if header else {}
    except ValueError:
        info = {}
    info = info if isinstance(info, dict) else {}
    return Page(
        items=[],
        page=int(info.get("CurrentPage") or page),
        page_size=int(info.get("PageSize") or size),
        total_count=_int(info.get("TotalCount")),
        total_pages=_int(info.get("TotalPages")),
    )


def _int(value: Any) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None
