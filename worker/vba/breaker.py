"""A fleet-wide pause of VBA calls while VBA is known to be down: a circuit breaker.

Without it, every pair's flush task finds out about an outage on its own: thirty tasks make
thirty calls (or thirty logins) that VBA answers 429 within the same second. With it, the first
failures pause every process until a time shared through Redis:

- a 429 or 503 carrying ``Retry-After`` pauses everyone for that long, at once (VBA said so);
- ``threshold`` failures in a row (5xx, timeouts, refused connections) pause everyone for
  ``base * 2**(n - threshold)`` seconds (capped), or the Retry-After if that is longer;
- when the pause ends, one process (the holder of a short probe lock) calls; the others keep
  waiting until its call succeeds (everything resumes) or fails (a longer pause).

A paused call raises :class:`~worker.vba.errors.VbaUnavailable` with ``retry_after`` set, so the
flush backs its pair off exactly as if VBA had answered. Without Redis the same state lives in
the process.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Callable
from typing import Protocol

from redis import Redis

from worker.logs import Log
from worker.vba.errors import VbaUnavailable

log = Log("vba.breaker")

#: The longest fleet-wide pause without a Retry-After: one probe a minute is cheap.
PAUSE_CAP = 60.0

# KEYS[1] state hash {until, fails}, KEYS[2] probe lock; ARGV probe ttl ms, owner.
# Returns seconds to wait ('0' = call now). Redis TIME is the clock every process shares.
_CHECK = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local until_ = tonumber(redis.call('HGET', KEYS[1], 'until'))
if not until_ then return '0' end
if now < until_ then return string.format('%.3f', until_ - now) end
if redis.call('SET', KEYS[2], ARGV[2], 'NX', 'PX', ARGV[1]) then return '0' end
return string.format('%.3f', math.max(0.05, redis.call('PTTL', KEYS[2]) / 1000))
"""

_REMAINING = """
local t = redis.call('TIME')
local until_ = tonumber(redis.call('HGET', KEYS[1], 'until')) or 0
return string.format('%.3f', math.max(0, until_ - tonumber(t[1]) - tonumber(t[2]) / 1000000))
"""

# KEYS as above; ARGV threshold, retry_after (-1: none), base, cap, ttl ms.
# Returns the seconds of the pause now in force ('0' = none).
_FAIL = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local fails = redis.call('HINCRBY', KEYS[1], 'fails', 1)
local threshold, retry_after = tonumber(ARGV[1]), tonumber(ARGV[2])
local delay = math.max(0, retry_after)
if fails >= threshold then
  delay = math.max(delay, math.min(tonumber(ARGV[4]), tonumber(ARGV[3]) * 2 ^ (fails - threshold)))
end
local until_ = tonumber(redis.call('HGET', KEYS[1], 'until')) or 0
if delay > 0 and now + delay > until_ then
  until_ = now + delay
  redis.call('HSET', KEYS[1], 'until', string.format('%.6f', until_))
end
redis.call('PEXPIRE', KEYS[1], ARGV[5])
redis.call('DEL', KEYS[2])
return string.format('%.3f', math.max(0, until_ - now))
"""


class Breaker(Protocol):
    """Asked before every VBA call, told after it."""

    def wait(self) -> float:
        """Seconds until a call may go (0: go now; as the probe, if the pause just ended)."""
        ...

    def remaining(self) -> float:
        """Seconds the current pause lasts (0: none), without taking the probe."""
        ...

    def failed(self, retry_after: float | None) -> float:
        """A call failed (VBA unavailable); returns the pause now in force, in seconds."""
        ...

    def succeeded(self) -> None:
        """A call got an answer: VBA is up, every process resumes."""
        ...


def check(breaker: Breaker) -> None:
    """Raise VbaUnavailable(retry_after=...) while calls are paused; return when one may go."""
    wait = breaker.wait()
    if wait > 0:
        raise VbaUnavailable(
            f"VBA calls paused fleet-wide for {wait:.1f}s", retry_after=wait, may_have_landed=False
        )


class LocalBreaker:
    """The breaker's state in this process (the embedded defaults: one worker process)."""

    def __init__(
        self,
        threshold: int,
        base: float,
        cap: float,
        probe_ttl: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.threshold, self.base, self.cap, self.probe_ttl = threshold, base, cap, probe_ttl
        self.clock = clock
        self.until: float | None = None
        self.fails = 0
        self.probe_until = 0.0
        self._lock = threading.Lock()

    def wait(self) -> float:
        with self._lock:
            now = self.clock()
            if self.until is None:
                return 0.0
            if now < self.until:
                return self.until - now
            if now >= self.probe_until:
                self.probe_until = now + self.probe_ttl
                return 0.0
            return max(0.05, self.probe_until - now)

    def remaining(self) -> float:
        with self._lock:
            return max(0.0, (self.until or 0.0) - self.clock())

    def failed(self, retry_after: float | None) -> float:
        with self._lock:
            now = self.clock()
            self.fails += 1
            delay = pause(self.fails, self.threshold, self.base, self.cap, retry_after)
            if delay is not None and now + delay > (self.until or 0.0):
                self.until = now + delay
            self.probe_until = 0.0
            return max(0.0, (self.until or now) - now)

    def succeeded(self) -> None:
        with self._lock:
            self.until, self.fails, self.probe_until = None, 0, 0.0


def pause(
    fails: int, threshold: int, base: float, cap: float, retry_after: float | None
) -> float | None:
    """The pause a failure calls for: Retry-After, or backoff past the threshold if longer."""
    backoff = min(cap, base * 2 ** (fails - threshold)) if fails >= threshold else 0.0
    delay = max(retry_after or 0.0, backoff)
    return delay if delay > 0 else None


class RedisBreaker:
    """The same state in Redis, shared by every process that calls the same VBA account."""

    def __init__(
        self, redis: Redis, prefix: str, threshold: int, base: float, cap: float, probe_ttl: float
    ) -> None:
        self.redis, self.key, self.probe_key = redis, f"{prefix}:breaker", f"{prefix}:probe"
        self.threshold, self.base, self.cap, self.probe_ttl = threshold, base, cap, probe_ttl
        self._check = redis.register_script(_CHECK)
        self._fail = redis.register_script(_FAIL)
        self._remaining = redis.register_script(_REMAINING)
        self.owner = secrets.token_hex(8)

    def wait(self) -> float:
        ttl_ms = str(int(self.probe_ttl * 1000))
        raw = self._check(keys=[self.key, self.probe_key], args=[ttl_ms, self.owner])
        return float(raw.decode() if isinstance(raw, bytes) else raw)

    def remaining(self) -> float:
        raw = self._remaining(keys=[self.key])
        return float(raw.decode() if isinstance(raw, bytes) else raw)

    def failed(self, retry_after: float | None) -> float:
        ttl_ms = int((max(self.cap, retry_after or 0.0) + 600) * 1000)
        args = [self.threshold, -1 if retry_after is None else retry_after, self.base, self.cap]
        raw = self._fail(keys=[self.key, self.probe_key], args=[*map(repr, args), str(ttl_ms)])
        return float(raw.decode() if isinstance(raw, bytes) else raw)

    def succeeded(self) -> None:
        self.redis.delete(self.key, self.probe_key)
