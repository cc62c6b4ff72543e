"""VBA down for a sustained spell: 429 on everything (logins too), then 500s, then hung calls."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest

from tests.chaos.conftest import Chaos, distinctive
from worker.demo.sandboxes import SandboxHandle
from worker.demo.streams import StreamSpec, generate

pytestmark = pytest.mark.chaos

#: (name, sandbox faults, seconds): "minutes" of outage scaled down to ~28 s in all.
PHASES: list[tuple[str, dict[str, Any], float]] = [
    ("429 everywhere, logins included, Retry-After 2", {"rate_429": 1.0, "retry_after": 2}, 10),
    ("500 on every call, no Retry-After", {"rate_429": 0.0, "error_500": 1.0}, 10),
    ("every call hangs 4 s past a 1 s timeout", {"error_500": 0.0, "timeout_rate": 1.0}, 8),
]


class CallRate:
    """Samples the sandbox's request counter every second: calls per second, per phase."""

    def __init__(self, sandbox: SandboxHandle) -> None:
        self.sandbox, self.samples = sandbox, list[tuple[float, int, str]]()
        self.phase = "before"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(1.0):
            total = self.sandbox.admin.counters()["total"]
            self.samples.append((time.monotonic(), total, self.phase))

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def per_second(self) -> list[int]:
        return [b[1] - a[1] for a, b in zip(self.samples, self.samples[1:], strict=False)]

    def over_the_bucket(self, rate: float, burst: int) -> list[str]:
        """Windows with more calls than VBA's bucket allows: ``burst + rate * seconds``."""
        over = []
        for i, (t0, n0, _) in enumerate(self.samples):
            for t1, n1, _ in self.samples[i + 1 :]:
                if n1 - n0 > burst + rate * (t1 - t0):
                    over.append(f"{n1 - n0} calls in {t1 - t0:.1f} s")
        return over

    def calls_in(self, phase: str) -> int:
        totals = [t for _, t, p in self.samples if p == phase]
        return totals[-1] - totals[0] if len(totals) > 1 else 0


def test_sustained_outage_holds_backlog_without_a_retry_storm(chaos: Chaos) -> None:
    """28 s of 429/500/hangs: nothing dead-lettered, calls stay few and paced, all drains after."""
    sandbox = chaos.vba(rate_429=1.0, retry_after=2, timeout_seconds=4)
    stack = chaos.stack(vba_timeout="1")
    events = distinctive(generate(StreamSpec(events=1_600, members=60, seed=73)))
    rate = CallRate(sandbox)
    stack.worker("w1", concurrency=2)
    stack.worker("w2", concurrency=2)
    stack.beat()
    stack.send(events[:800])
    outage_started = time.monotonic()
    for i, (name, faults, seconds) in enumerate(PHASES):
        sandbox.admin.set_faults(**faults)
        rate.phase = name
        if i == 1:
            stack.send(events[800:])  # intake goes on while VBA is down
        time.sleep(seconds)
    outage = time.monotonic() - outage_started
    assert stack.dead("flush") == 0 and stack.pending() > 0  # held, not dead-lettered
    during = sandbox.admin.counters()
    sandbox.admin.set_faults(timeout_rate=0.0)
    rate.phase = "after"
    chaos.drain(stack, len({e["event_id"] for e in events}))
    rate.stop()
    calls = {name: rate.calls_in(name) for name, _, _ in PHASES}
    busiest = max(rate.per_second())
    logins = sum(during["by_route"].get("auth.login", {}).values())
    # No storm: a few probes while VBA is down; never more than VBA's bucket (25/s, 50 burst),
    # and after the outage VBA's own limiter never had to say 429.
    assert rate.over_the_bucket(25, 50) == []
    assert sandbox.admin.counters()["by_status"].get("429", 0) == during["by_status"].get("429", 0)
    assert sum(calls.values()) <= 3 * outage, calls
    assert logins <= outage / 2 + 2, logins
    chaos.finish(
        stack,
        events,
        fault="VBA unavailable: 429 (logins too), 500, hung calls",
        injected=f"sandbox faults for {outage:.0f} s in 3 phases, 2 workers x 2 processes",
        times=len(PHASES),
        events_in=len(events),
        extra={
            "outage_seconds": round(outage, 1),
            "vba_calls_per_phase": calls,
            "login_attempts_during_outage": logins,
            "busiest_second_calls": busiest,
            "calls_per_second": rate.per_second(),
        },
    )
