"""VBA's id token: log in once per fleet, share the token through Redis, refresh before expiry.

VBA answers 429 to logins that come too often, so every process reads the one token from the
store and only the holder of the store's lock logs in or refreshes; the others wait for its token.
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass
from typing import Any, Final, Protocol

import httpx
from redis import Redis
from redis.exceptions import LockNotOwnedError

from worker.logs import Log
from worker.settings import Settings
from worker.vba.errors import VbaAuthError, VbaUnavailable, classify, envelope_of
from worker.vba.ratelimit import RateLimiter

log = Log("vba.auth")

#: VBA documents a 24 h token; used when the login answer has no ``expiresIn``.
DEFAULT_LIFETIME = 24 * 3600.0
LOCK_TTL_MS = 30_000


@dataclass(frozen=True, slots=True)
class Token:
    """An id token, its refresh token, and when to refresh it (epoch seconds)."""

    id_token: str
    refresh_token: str | None
    refresh_at: float
    expires_at: float

    def usable(self, now: float, stale: str | None = None) -> bool:
        """Fresh enough to send, and not the token VBA just refused."""
        return self.id_token != stale and now < self.refresh_at

    @classmethod
    def issued(cls, result: dict[str, Any], refresh_token: str | None, now: float) -> Token:
        """From ``data.authenticationResult``; refreshed a tenth of its life (<= 1 h) early."""
        lifetime = float(result.get("expiresIn") or DEFAULT_LIFETIME)
        margin = min(3600.0, lifetime * 0.1)
        refresh = result.get("refreshToken") or refresh_token
        return cls(str(result["idToken"]), refresh, now + lifetime - margin, now + lifetime)

    def __repr__(self) -> str:
        return f"Token(refresh_at={self.refresh_at:.0f}, expires_at={self.expires_at:.0f})"


class TokenStore(Protocol):
    """Where the token lives, and a lock so one caller at a time renews it."""

    def load(self) -> Token | None: ...
    def save(self, token: Token) -> None: ...
    def try_lock(self) -> Any: ...


class LocalTokenStore:
    """The token in this process only (embedded defaults)."""

    def __init__(self) -> None:
        self._token: Token | None = None
        self._lock = threading.Lock()

    def load(self) -> Token | None:
        return self._token

    def save(self, token: Token) -> None:
        self._token = token

    @contextmanager
    def try_lock(self) -> Iterator[bool]:
        held = self._lock.acquire(timeout=0.05)
        try:
            yield held
        finally:
            if held:
                self._lock.release()


class RedisTokenStore:
    """The token in Redis, one per (VBA, database, user, key); a SET NX PX lock guards renewal."""

    def __init__(self, redis: Redis, prefix: str) -> None:
        self.redis, self.key, self.lock_key = redis, f"{prefix}:token", f"{prefix}:token-lock"

    def load(self) -> Token | None:
        raw = self.redis.get(self.key)
        return Token(**json.loads(raw)) if raw else None

    def save(self, token: Token) -> None:
        ttl_ms = max(1000, int((token.expires_at - time.time()) * 1000))
        self.redis.set(self.key, json.dumps(asdict(token)), px=ttl_ms)

    @contextmanager
    def try_lock(self) -> Iterator[bool]:
        """redis-py's lock, without waiting: held by one process at a time, for at most its TTL,
        and released only by its holder (a holder that outlived the TTL releases nothing)."""
        lock = self.redis.lock(self.lock_key, timeout=LOCK_TTL_MS / 1000, blocking=False)
        held = bool(lock.acquire())
        try:
            yield held
        finally:
            if held:
                with suppress(LockNotOwnedError):
                    lock.release()


def store_prefix(settings: Settings) -> str:
    """A Redis key prefix naming this VBA account without revealing its secrets."""
    s = settings
    parts = (s.vba_base_url, s.vba_database, s.vba_username, s.vba_api_key.get_secret_value())
    ident = "|".join(parts)
    return "accumsync:vba:" + hashlib.sha256(ident.encode()).hexdigest()[:16]


class Authenticator:
    """Hands out a usable id token, logging in or refreshing (once, fleet-wide) when needed."""

    def __init__(
        self,
        settings: Settings,
        http: httpx.Client,
        store: TokenStore,
        limiter: RateLimiter,
        clock: Callable[[], float] = time.time,
        on_event: Callable[[str], None] = lambda _: None,
    ) -> None:
        self.settings, self.http, self.store, self.limiter = settings, http, store, limiter
        self.clock, self.on_event = clock, on_event
        self._cached: Token | None = None

    def token(self) -> str:
        """A usable id token, from this process's cache, the shared store, or a renewal."""
        if self._cached and self._cached.usable(self.clock()):
            return self._cached.id_token
        return self.renew(stale=None)

    def renew(self, stale: str | None) -> str:
        """A token other than ``stale``: another process's fresh one, or one we renew ourselves."""
        deadline = self.clock() + self.settings.vba_timeout * 2
        while True:
            current = self.store.load()
            if current and current.usable(self.clock(), stale):
                return self._use(current)
            with self.store.try_lock() as held:
                if held:
                    return self._use(self._renew_locked(stale))
            if self.clock() > deadline:
                raise VbaUnavailable(
                    "timed out waiting for another process to renew the token",
                    may_have_landed=False,
                )
            time.sleep(0.05)

    def _renew_locked(self, stale: str | None) -> Token:
        current = self.store.load()
        if current and current.usable(self.clock(), stale):
            return current
        token = self._refresh(current) if current and current.refresh_token else None
        token = token or self._login()
        self.store.save(token)
        return token

    def _use(self, token: Token) -> str:
        self._cached = token
        return token.id_token

    def _refresh(self, current: Token) -> Token | None:
        """POST /user-refresh-tokens; None when VBA refuses it (then we log in again)."""
        headers = {"expired-id-token": current.id_token, "refresh-token": current.refresh_token}
        try:
            result = self._post("/user-refresh-tokens", {k: v or "" for k, v in headers.items()})
        except VbaAuthError as exc:
            log.warning("vba.refresh_refused", status=exc.status, activity_id=exc.activity_id)
            return None
        log.info("vba.token_refreshed")
        self.on_event("vba_token_refreshes")
        return Token.issued(result, current.refresh_token, self.clock())

    def _login(self) -> Token:
        """POST /user-authentication with Basic credentials."""
        s = self.settings
        basic = f"{s.vba_username}:{s.vba_password.get_secret_value()}".encode()
        auth = "Basic " + base64.b64encode(basic).decode()
        result = self._post("/user-authentication", {"Authorization": auth})
        log.info("vba.logged_in")
        self.on_event("vba_logins")
        return Token.issued(result, None, self.clock())

    def _post(self, path: str, extra: dict[str, str]) -> dict[str, Any]:
        """One auth call; its ``data.authenticationResult``, or VbaAuthError / VbaUnavailable."""
        s = self.settings
        headers = {
            "x-api-key": s.vba_api_key.get_secret_value(),
            "vbasoftware-client-id": s.vba_client_id,
            "vbasoftware-client-code": s.vba_client_code,
            "vbasoftware-database": s.vba_database,
            **extra,
        }
        self.limiter.acquire()
        try:
            response = self.http.post(path, headers=headers)
        except httpx.TransportError as exc:
            log.warning("vba.auth_unreachable", path=path, error=type(exc).__name__)
            raise VbaUnavailable(
                f"VBA unreachable: {type(exc).__name__}", may_have_landed=False
            ) from exc
        if (counted := STATUS_EVENTS.get(response.status_code)) is not None:
            self.on_event(counted)
        return _auth_result(path, response)


#: Answers worth a durable count (``accumsync metrics``, ``health``), by HTTP status.
STATUS_EVENTS: Final = {401: "vba_401", 403: "vba_403", 429: "vba_429"}


def _auth_result(path: str, response: httpx.Response) -> dict[str, Any]:
    envelope = envelope_of(response)
    error = classify(response, envelope)
    if isinstance(error, VbaUnavailable):
        aid = error.activity_id
        log.warning("vba.auth_unavailable", path=path, status=error.status, activity_id=aid)
        raise error
    result = envelope.data.get("authenticationResult") if isinstance(envelope.data, dict) else None
    if error is not None or not isinstance(result, dict) or not result.get("idToken"):
        status = response.status_code
        log.error("vba.auth_refused", path=path, status=status, activity_id=envelope.activity_id)
        title = getattr(error, "title", None) or "no token in the answer"
        raise VbaAuthError(status, title, getattr(error, "detail", None), envelope.activity_id)
    return result
