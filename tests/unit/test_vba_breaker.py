"""The fleet-wide pause of VBA calls: Retry-After honoured, a threshold, one probe, reset."""

from __future__ import annotations

import httpx
import pytest

from tests.unit.vba_fake import FakeVba, problem, vba_json
from worker.vba import VbaUnavailable
from worker.vba.breaker import LocalBreaker


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def breaker(clock: Clock) -> LocalBreaker:
    return LocalBreaker(threshold=3, base=1.0, cap=8.0, probe_ttl=2.0, clock=clock)


def test_retry_after_pauses_at_once() -> None:
    """A failure with Retry-After pauses calls for that long, below the threshold too."""
    clock = Clock()
    b = breaker(clock)
    assert b.failed(5.0) == 5.0
    assert b.wait() == 5.0
    clock.now += 5
    assert b.wait() == 0.0  # the probe may go


def test_failures_pause_only_past_the_threshold_then_back_off() -> None:
    """Two failures in a row do not pause; the third pauses 1 s, the fourth 2 s, capped at 8."""
    clock = Clock()
    b = breaker(clock)
    assert [b.failed(None) for _ in range(2)] == [0.0, 0.0]
    assert b.wait() == 0.0
    assert b.failed(None) == 1.0
    assert b.failed(None) == 2.0
    assert [b.failed(None) for _ in range(4)][-1] == 8.0


def test_one_probe_at_a_time_after_a_pause() -> None:
    """When a pause ends one caller probes; the others wait until it succeeds."""
    clock = Clock()
    b = breaker(clock)
    b.failed(1.0)
    clock.now += 1
    assert b.wait() == 0.0  # the probe
    assert b.wait() > 0  # everyone else
    b.succeeded()
    assert b.wait() == 0.0 and b.wait() == 0.0 and b.remaining() == 0.0


def test_a_failed_probe_pauses_again() -> None:
    """The probe failing starts a new pause; the next probe comes after it."""
    clock = Clock()
    b = breaker(clock)
    b.failed(1.0)
    clock.now += 1
    assert b.wait() == 0.0
    assert b.failed(3.0) == 3.0
    assert b.remaining() == 3.0


def test_client_makes_one_call_while_vba_is_down() -> None:
    """Twenty calls against a VBA answering 429 Retry-After: 30 send one request; all fail fast."""
    fake = FakeVba(*[problem(429, headers={"Retry-After": "30"})] * 20)
    client = fake.client()
    for _ in range(20):
        with pytest.raises(VbaUnavailable) as caught:
            client.list_accumulators("123456789", "GRP1")
        assert caught.value.retry_after is not None and caught.value.retry_after > 25
    assert len(fake.calls) == 1
    assert client.paused() > 25


def test_client_resumes_after_a_success() -> None:
    """A success clears the failure count: the next failures start from zero."""
    ok = vba_json([], headers={"X-Pagination": "{}"})
    fail = problem(500)
    fake = FakeVba(fail, fail, ok, fail, fail, ok)
    client = fake.client()
    for answer in (fail, fail, ok, fail, fail, ok):
        if answer is ok:
            client.list_accumulators("123456789", "GRP1")
        else:
            with pytest.raises(VbaUnavailable):
                client.list_accumulators("123456789", "GRP1")
    assert len(fake.calls) == 6 and client.paused() == 0.0


def test_transport_errors_count_as_failures() -> None:
    """Refused connections count toward the threshold like 5xx answers."""
    refused = httpx.ConnectError("refused")
    fake = FakeVba(*[refused] * 6)
    client = fake.client(backoff_base=10.0)
    for _ in range(4):
        with pytest.raises(VbaUnavailable):
            client.list_accumulators("123456789", "GRP1")
    assert len(fake.calls) == 6  # 3 calls (each with its one quick reconnect), then paused
    assert client.paused() > 9
