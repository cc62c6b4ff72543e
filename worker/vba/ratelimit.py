"""VBA's token bucket on our side: one bucket per API key, shared through Redis by every process.

A call *reserves* a token: the bucket may go negative and the caller sleeps until its token is
due, so waiting callers are served in order with one Redis round trip each and no polling.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from typing import Protocol

from redis import Redis

#: Burst tokens we leave unused, as a share of VBA's burst (and at least ``MIN_HEADROOM``). VBA's
#: bucket counts a call when it arrives, ours when it leaves: a call delayed on the way (a loaded
#: host, a slow connection) arrives beside later ones, and with equal buckets VBA sees more calls
#: in a window than ours let out and answers 429. A tenth of 50 absorbs 200 ms of such delay at
#: 25/s; the sustained rate is VBA's either way. (Two tokens were left before: CI saw one 429
#: after an outage, on a host with 4 test lanes on 2 cores.)
HEADROOM_SHARE = 0.1
MIN_HEADROOM = 2


def client_burst(burst: int) -> int:
    """The burst our bucket allows for VBA's ``burst``: a little less, never below 1."""
    headroom = max(MIN_HEADROOM, math.ceil(burst * HEADROOM_SHARE))
    return max(1, burst - headroom)


# KEYS[1] bucket; ARGV rate/s, burst. Redis TIME is the one clock every process shares.
_RESERVE = """
local rate = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local state = redis.call('HMGET', KEYS[1], 'tokens', 'ts')
local tokens = tonumber(state[1]) or burst
local ts = tonumber(state[2]) or now
tokens = math.min(burst, tokens + math.max(0, now - ts) * rate) - 1
redis.call('HSET', KEYS[1], 'tokens', string.format('%.6f', tokens),
           'ts', string.format('%.6f', now))
redis.call('PEXPIRE', KEYS[1], math.ceil((burst - tokens) / rate * 1000) + 60000)
if tokens >= 0 then return '0' end
return string.format('%.6f', -tokens / rate)
"""


class RateLimiter(Protocol):
    """Something that blocks until the next call may go."""

    def reserve(self) -> float:
        """Take a token now; the seconds until it is due."""
        ...

    def acquire(self) -> float:
        """Block until a token is ours; return the seconds waited."""
        ...


class LocalBucket:
    """An in-process token bucket (the embedded defaults: one worker process)."""

    def __init__(
        self,
        rate: float,
        burst: int,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.rate, self.burst = rate, float(burst)
        self._clock, self._sleep = clock, sleep
        self._tokens, self._ts = float(burst), clock()
        self._lock = threading.Lock()

    def reserve(self) -> float:
        """Take a token now; the seconds until it is due (0 when one was in the bucket)."""
        with self._lock:
            now = self._clock()
            self._tokens = min(self.burst, self._tokens + (now - self._ts) * self.rate) - 1
            self._ts = now
            return max(0.0, -self._tokens / self.rate)

    def acquire(self) -> float:
        """Block until a token is ours; return the seconds waited."""
        wait = self.reserve()
        if wait > 0:
            self._sleep(wait)
        return wait


class RedisBucket:
    """The same bucket held in Redis and updated by one atomic Lua script."""

    def __init__(self, redis: Redis, key: str, rate: float, burst: int) -> None:
        self.redis, self.key, self.rate, self.burst = redis, key, rate, burst
        self._script = redis.register_script(_RESERVE)

    def reserve(self) -> float:
        """Take a token now; the seconds until it is due (0 when one was in the bucket)."""
        raw = self._script(keys=[self.key], args=[repr(self.rate), str(self.burst)])
        return float(raw.decode() if isinstance(raw, bytes) else raw)

    def acquire(self) -> float:
        """Block until a token is ours; return the seconds waited."""
        wait = self.reserve()
        if wait > 0:
            time.sleep(wait)
        return wait
