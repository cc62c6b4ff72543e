"""The whole worker SIGKILLed on the Redis broker at the two instants kombu's own transport can
lose a message: between taking it from its queue and recording it as unacknowledged, and inside
the restore that puts an expired message back on its queue (worker/redisbroker.py).

Each scenario runs on a Redis server of its own: on a shared one, other tests' workers restore
expired messages and sweep dead consumers of any queue (as they should), and would do the
restores this test means its own workers to be killed in.

Each killed worker is started with a failpoint (worker/failpoints.py) that kills its process
group, main process and pool, at that instant; a clean worker then finishes the stream, and VBA
must equal the oracle to the cent, each event counted once however often it was delivered.
"""

from __future__ import annotations

import re
import socket
import subprocess
from typing import Any

import pytest

from tests.chaos.conftest import Chaos, ChaosStack, distinctive
from worker.demo.procs import CELERY, Child, wait_for, worker_argv
from worker.demo.streams import StreamSpec, generate

pytestmark = pytest.mark.chaos

KILLS = 10
#: A dead consumer's messages come back once its heartbeat has been silent this long.
CONSUMER_TTL = "2"
SWEPT = re.compile(r"broker\.consumer_swept.*?taken=(\d+).*?recorded=(\d+)")


def killed_at(
    stack: ChaosStack, name: str, failpoint: str, timeout: float = 90, **env: str
) -> Child:
    """A worker started with ``failpoint`` armed to kill its whole process group, waited for
    until it is dead (it must reach the failpoint: the test fails otherwise)."""
    argv = worker_argv(f"{name}-{stack.queue}", 1)
    env = stack.env | env | {"ACCUMSYNC_FAILPOINT": f"{failpoint}:group"}
    child = Child(name, argv, env, stack.tmp / "logs" / f"{name}.log").start()
    stack.children.append(child)
    assert wait_for(lambda: not child.alive(), timeout, 0.1), (
        f"{name} never reached {failpoint}:\n{child.output()[-3000:]}"
    )
    assert f'"point": "{failpoint}"' in child.output() or failpoint in child.output()
    return child


def swept(stack: ChaosStack) -> dict[str, int]:
    """Messages the workers' sweeps gave back from dead consumers, by where they were."""
    taken = recorded = 0
    for match in SWEPT.finditer(stack.logs()):
        taken += int(match[1])
        recorded += int(match[2])
    return {"taken_not_recorded": taken, "recorded_not_acknowledged": recorded}


def finish_clean(
    chaos: Chaos, stack: ChaosStack, events: list[Any], fault: str, how: str
) -> dict[str, Any]:
    """A clean worker and beat finish the stream; VBA must equal the oracle to the cent. The
    worker still answers ``celery inspect`` (its control messages ride the same transport)."""
    stack.worker("clean", concurrency=2)
    node = f"clean-{stack.queue}@{socket.gethostname()}"
    argv = [*CELERY, "inspect", "ping", "-d", node, "-t", "5"]
    ping = subprocess.run(argv, env=stack.env, capture_output=True, text=True, timeout=60)
    assert ping.returncode == 0 and "pong" in ping.stdout, ping.stdout + ping.stderr
    stack.beat()
    chaos.drain(stack, len({e["event_id"] for e in events}), timeout=120)
    return chaos.finish(
        stack,
        events,
        fault=fault,
        injected=how,
        times=KILLS,
        events_in=len(events),
        extra={"returned_by_sweep": swept(stack), "consumer_ttl_seconds": float(CONSUMER_TTL)},
    )


def test_killed_between_take_and_record_ten_times_loses_nothing(chaos: Chaos) -> None:
    """Ten workers, each killed the instant it has taken its first message: none is lost."""
    chaos.vba()
    redis = chaos.private_redis()
    stack = chaos.stack(
        broker_url=redis.url, broker_fetch="reliable", broker_consumer_ttl=CONSUMER_TTL
    )
    events = distinctive(generate(StreamSpec(events=1_000, members=50, seed=81)))
    stack.send(events, batch=50)  # 20 messages wait before any worker starts
    for i in range(KILLS):
        killed_at(stack, f"k{i}", "broker.after_take")
    finish_clean(
        chaos,
        stack,
        events,
        "worker SIGKILLed between taking a message from Redis and recording it",
        "failpoint broker.after_take:group, the first message each of ten workers takes (50 "
        "events in each message)",
    )


def test_killed_inside_the_restore_ten_times_loses_nothing(chaos: Chaos) -> None:
    """Workers die mid-batch with messages recorded but unacknowledged; the workers that put
    them back are killed inside that restore, ten times: none is lost, none counted twice.

    Every other dead worker's heartbeat outlives the test: its messages come back through the
    visibility timeout's restore pass (kombu's, under its lock), not through the sweep. Every
    other one dies just after its first batch committed: that batch is delivered again, and its
    events are counted as duplicates, once."""
    chaos.vba()
    redis = chaos.private_redis()
    settings = {"broker_fetch": "reliable", "broker_consumer_ttl": CONSUMER_TTL}
    settings["broker_visibility_timeout"] = "3"
    stack = chaos.stack(broker_url=redis.url, **settings)
    events = distinctive(generate(StreamSpec(events=1_000, members=50, seed=82)))
    stack.send(events, batch=25)  # 40 messages
    stream_duplicates = len(events) - len({e["event_id"] for e in events})
    for i in range(KILLS):
        # Dies in (or just after) its first ingest transaction, its prefetched messages
        # recorded, unacknowledged.
        ttl = {"ACCUMSYNC_BROKER_CONSUMER_TTL": "3600"} if i % 2 else {}
        point = "ingest.after_commit" if i % 4 < 2 else "ingest.before_commit"
        killed_at(stack, f"holder{i}", point, **ttl)
        killed_at(stack, f"restorer{i}", "broker.restore")
    result = finish_clean(
        chaos,
        stack,
        events,
        "worker SIGKILLed inside the restore of unacknowledged messages",
        "failpoint broker.restore:group in ten workers, each after a worker killed in its first "
        "ingest transaction or just after its commit (failpoints ingest.before_commit:group, "
        "ingest.after_commit:group) left its prefetched messages recorded and unacknowledged; "
        "half of those are restored by the sweep of dead consumers, half by the visibility "
        "timeout's pass",
    )
    # The batches committed before their kill came again: counted as duplicates, applied once.
    assert result["duplicates"] > stream_duplicates, result
