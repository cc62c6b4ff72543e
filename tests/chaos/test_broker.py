"""The broker goes away mid-run: a private append-only Redis killed and restarted, then a
network partition that leaves every open connection silent (no FIN, no RST)."""

from __future__ import annotations

import time

import pytest

from tests.chaos.conftest import Chaos, EventCapture, distinctive
from tests.chaos.netfault import Relay
from worker.demo.procs import wait_for
from worker.demo.streams import StreamSpec, generate

pytestmark = pytest.mark.chaos

#: (fault, seconds): Redis SIGKILLed and started again; then a partition: the workers' broker
#: connections go silent and stay so (a dropped NAT entry, a failover).
FAULTS = (("restart", 3.0), ("partition", 5.0))


def test_broker_restarts_and_partition_lose_nothing_and_workers_resume(chaos: Chaos) -> None:
    """Redis killed, later partitioned, mid-run: nothing lost, the workers consume again."""
    chaos.vba()
    redis = chaos.private_redis()
    relay = Relay(redis.port).start()
    url = f"redis://127.0.0.1:{relay.port}/0"
    stack = chaos.stack(broker_url=url, broker_health_check_interval="2")
    stack.producer_url = redis.url  # the test publishes around the relay, the workers through it
    events = distinctive(generate(StreamSpec(events=1_000, members=50, seed=75)))
    waves = [events[i :: len(FAULTS) + 1] for i in range(len(FAULTS) + 1)]
    workers = [stack.worker("w1", concurrency=2), stack.worker("w2", concurrency=1)]
    stack.beat()
    monitor = EventCapture(redis.url, stack.queue).start()  # Flower's view, beside the relay
    resumed, probes = [], []
    try:
        for i, (fault, seconds) in enumerate(FAULTS):
            stack.send(waves[i], batch=50)
            time.sleep(1.5)  # mid-ingest, with flushes starting
            if fault == "restart":
                redis.kill()
                time.sleep(seconds)
                redis.start()
            else:
                relay.partition()
                time.sleep(seconds)
                relay.heal()
            # Resumed on their own: a probe published now (straight to Redis) gets consumed.
            probe = dict(waves[i][0], event_id=f"probe-{i}")
            probes.append(probe)
            before = stack.received()
            stack.send([probe])
            started = time.monotonic()
            assert wait_for(lambda n=before: stack.received() > n, 90, 0.2), stack.logs()[-5000:]
            resumed.append(round(time.monotonic() - started, 1))
        stack.send(waves[-1], batch=50)
        valid = events + probes
        chaos.drain(stack, len({e["event_id"] for e in valid}), timeout=120)
    finally:
        relay.stop()
    assert all(w.alive() for w in workers), stack.logs()[-8000:]  # why a worker stopped
    chaos.finish(
        stack,
        valid,
        fault="broker (Redis) restart; network partition to the broker",
        injected="private redis-server (appendonly, fsync always) SIGKILLed, restarted after "
        "3 s; later every open connection to it silenced for good, new ones after 5 s (relay)",
        times=len(FAULTS),
        events_in=len(events) + len(probes),
        monitor=monitor.stop(),
        extra={
            "seconds_until_consuming_again": dict(
                zip([f"{f} {s:g}s" for f, s in FAULTS], resumed, strict=True)
            ),
            "celery_task_events_scanned": monitor.task_events(),
        },
    )
