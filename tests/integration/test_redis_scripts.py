"""The Redis twins of the rate bucket, the breaker and the token lock, run against a real Redis:
their Lua scripts (and redis-py's lock) are what every worker of a fleet shares, so they are
held to the same rules as the in-process twins the unit tests pin with a fake clock.

Each test uses keys of its own on the shared Redis and deletes them; times are real (Redis's
TIME is the fleet's clock), kept short, and compared with generous margins: what is checked is
behaviour (paused or not, one probe, tokens paced), never a speed.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from contextlib import ExitStack

import pytest
from redis import Redis

from worker.vba.auth import RedisTokenStore
from worker.vba.breaker import RedisBreaker
from worker.vba.ratelimit import LocalBucket, RedisBucket

pytestmark = pytest.mark.integration


@pytest.fixture
def redis(redis_url: str) -> Iterator[Redis]:
    client = Redis.from_url(redis_url)
    yield client
    client.close()


@pytest.fixture
def prefix(redis: Redis) -> Iterator[str]:
    name = f"accumsync:test:{uuid.uuid4().hex[:10]}"
    yield name
    keys = list(redis.scan_iter(f"{name}*"))
    if keys:
        redis.delete(*keys)


def test_the_redis_bucket_lets_the_burst_through_then_paces_at_the_rate(
    redis: Redis, prefix: str
) -> None:
    """Burst 5 at 10/s: five tokens at once, then each a tenth of a second later, for every
    process alike (two buckets on one key are one bucket); the local twin agrees."""
    first, second = (RedisBucket(redis, f"{prefix}:rate", 10.0, 5) for _ in range(2))
    local = LocalBucket(10.0, 5)
    waits = [(first if i % 2 else second).reserve() for i in range(8)]
    local_waits = [local.reserve() for _ in range(8)]
    assert waits[:5] == [0.0] * 5 and local_waits[:5] == [0.0] * 5
    for n, (got, expected) in enumerate(zip(waits[5:], local_waits[5:], strict=True), start=1):
        assert got == pytest.approx(n / 10, abs=0.03) and expected == pytest.approx(
            n / 10, abs=0.03
        )


def test_the_redis_bucket_refills_and_never_holds_more_than_its_burst(
    redis: Redis, prefix: str
) -> None:
    """Empty after the burst; after 0.5 s at 10/s it holds 5 again, not more however long it
    waits."""
    bucket = RedisBucket(redis, f"{prefix}:rate", 10.0, 5)
    for _ in range(5):
        bucket.reserve()
    time.sleep(1.0)  # twice what refills it
    assert [bucket.reserve() for _ in range(5)] == [0.0] * 5
    assert bucket.reserve() > 0.05


def breaker(redis: Redis, prefix: str) -> RedisBreaker:
    return RedisBreaker(redis, prefix, threshold=3, base=0.2, cap=1.6, probe_ttl=0.5)


def test_the_redis_breaker_pauses_past_the_threshold_then_backs_off(
    redis: Redis, prefix: str
) -> None:
    """Two failures pause nothing; the third pauses 0.2 s, the fourth 0.4 s, capped at 1.6 s;
    another process sees the same pause."""
    b, other = breaker(redis, prefix), breaker(redis, prefix)
    assert [b.failed(None) for _ in range(2)] == [0.0, 0.0] and other.wait() == 0.0
    assert b.failed(None) == pytest.approx(0.2, abs=0.02)
    assert b.failed(None) == pytest.approx(0.4, abs=0.02)
    assert [b.failed(None) for _ in range(4)][-1] == pytest.approx(1.6, abs=0.02)
    assert other.remaining() == pytest.approx(1.6, abs=0.05) and other.wait() > 1.4


def test_the_redis_breaker_lets_one_probe_through_and_a_success_resumes_everyone(
    redis: Redis, prefix: str
) -> None:
    """A Retry-After pauses at once; when it ends one process probes and the others wait; the
    probe's success resumes all; a failed probe pauses again."""
    b, other = breaker(redis, prefix), breaker(redis, prefix)
    assert b.failed(0.3) == pytest.approx(0.3, abs=0.02)
    assert other.wait() > 0.2
    time.sleep(0.35)
    assert b.wait() == 0.0  # the probe
    assert other.wait() > 0  # everyone else waits for it
    assert b.failed(0.3) == pytest.approx(0.3, abs=0.02)  # the probe failed: paused again
    time.sleep(0.35)
    assert other.wait() == 0.0  # the next probe, another process's
    other.succeeded()
    assert b.wait() == 0.0 and other.wait() == 0.0 and b.remaining() == 0.0


def test_the_token_lock_is_held_by_one_and_released_only_by_its_holder(
    redis: Redis, prefix: str
) -> None:
    """One process renews the token at a time: a second try fails while the first holds the
    lock, and succeeds once it is released; a holder that outlived the lock's TTL releases
    nothing it no longer holds."""
    first, second = RedisTokenStore(redis, prefix), RedisTokenStore(redis, prefix)
    lock = f"{prefix}:token-lock"
    with first.try_lock() as held:
        assert held
        with second.try_lock() as also:
            assert not also
    with ExitStack() as later:
        with second.try_lock() as held_now:
            assert held_now
            redis.delete(lock)  # its TTL ran out, and another process took the lock:
            assert later.enter_context(first.try_lock())
        assert redis.exists(lock) == 1  # the late holder left the other's lock alone
    assert redis.exists(lock) == 0
