"""RabbitMQ under the workers: every connection closed by the broker mid-publish and mid-ingest,
then the broker app stopped for 20 s and started again. Publishers hear of every message the
broker did not take (publisher confirms): the test's own publisher retries or raises, and
``accumsync publish`` exits 4 naming the broker; the workers reconnect by themselves."""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from kombu.exceptions import OperationalError

from tests.chaos.conftest import Chaos, ChaosStack, EventCapture, distinctive
from tests.rabbitmq import app_stopped, close_connections, private_vhost
from worker.demo.procs import wait_for
from worker.demo.streams import StreamSpec, generate
from worker.ops.health import queue_lengths
from worker.settings import Settings

pytestmark = pytest.mark.chaos

STOPPED = 20.0  # seconds the broker app stays stopped


class Publisher(threading.Thread):
    """Publishes ``events`` in small paced batches, the last ``tail`` of them only once
    ``after`` is set (so some go out on a connection the broker has just closed); keeps what
    the broker confirmed and what raised (to publish again, as a producer whose publish failed
    must)."""

    def __init__(self, stack: ChaosStack, events: list[dict[str, Any]], after: threading.Event):
        super().__init__(daemon=True)
        self.stack, self.events, self.after = stack, events, after
        self.batch, self.tail = 5, 50
        self.confirmed: list[dict[str, Any]] = []
        self.refused: list[dict[str, Any]] = []
        self.errors: list[str] = []

    def run(self) -> None:
        for i in range(0, len(self.events), self.batch):
            if i >= len(self.events) - self.tail:
                self.after.wait(120)
            part = self.events[i : i + self.batch]
            try:
                self.stack.send(part, batch=self.batch)
                self.confirmed += part
            except Exception as exc:  # the publish failed, and said so
                self.refused += part
                self.errors.append(type(exc).__name__)
            time.sleep(0.1)


def jsonl(path: Path, events: list[dict[str, Any]]) -> str:
    path.write_text("".join(json.dumps(e) + "\n" for e in events))
    return str(path)


def consuming_again(stack: ChaosStack, template: dict[str, Any], name: str) -> float:
    """Seconds until a probe published now is recorded: the workers consume again."""
    before, started = stack.received(), time.monotonic()
    stack.send([dict(template, event_id=name)])
    assert wait_for(lambda: stack.received() > before, 90, 0.2), stack.logs()[-5000:]
    return round(time.monotonic() - started, 1)


def test_rabbitmq_connections_closed_and_app_stopped_lose_nothing(
    chaos: Chaos, amqp_url: str
) -> None:
    """Connections closed, then the app stopped 20 s: every confirmed event lands exactly."""
    chaos.vba()
    vhost, url = chaos.exits.enter_context(private_vhost(amqp_url))
    stack = chaos.stack(broker_url=url)
    events = distinctive(generate(StreamSpec(events=600, members=30, seed=76)))
    first, second, third = (events[i::3] for i in range(3))
    with ThreadPoolExecutor(2) as pool:  # two workers starting side by side
        workers = list(pool.map(lambda n: stack.worker(*n), [("w1", 2), ("w2", 1)]))
    stack.beat()
    monitor = EventCapture(url, stack.queue).start()
    probes = [dict(first[0], event_id="probe-closed"), dict(second[0], event_id="probe-stopped")]
    resumed = {}

    # (a) Every connection of the vhost closed by the broker while a publisher is mid-stream
    # and the workers mid-ingest: the publisher reconnects and publishes again (or raises).
    closed_done = threading.Event()
    publisher = Publisher(stack, first, closed_done)
    publisher.start()
    time.sleep(0.5)
    closed = close_connections(vhost)
    closed_done.set()
    publisher.join(120)
    assert not publisher.is_alive(), "the publisher hung after the connections were closed"
    resumed["close_all_connections"] = consuming_again(stack, probes[0], "probe-closed")

    # (b) The broker app stopped for 20 s (the node stays up, its listener closes).
    stack.send(second, batch=20)
    time.sleep(1.5)  # mid-ingest, with flushes starting
    third_file = jsonl(stack.tmp / "third.jsonl", third)
    with app_stopped(), ThreadPoolExecutor(2) as pool:
        stopped_at = time.monotonic()
        cli_run = pool.submit(stack.cli, "publish", third_file, check=False)
        health_run = pool.submit(stack.cli, "health", "--samples", "1", check=False)
        with pytest.raises(OperationalError) as refused:  # the test's publisher: told
            stack.send(third[:20])
        cli, health = cli_run.result(), health_run.result()
        time.sleep(max(0.0, STOPPED - (time.monotonic() - stopped_at)))
        stopped_for = round(time.monotonic() - stopped_at, 1)
    assert cli.returncode == 4, cli.stdout + cli.stderr
    assert "cannot reach the broker at 127.0.0.1:5672" in cli.stderr, cli.stderr
    assert "Traceback" not in cli.stderr and "guest:***@" in cli.stderr
    assert health.returncode == 1 and "cannot reach the broker" in health.stdout, health.stdout
    # The producer whose publish failed publishes again now the broker is back (beside the
    # probe: the CLI's start-up must not count in the workers' time to consume again).
    with ThreadPoolExecutor(1) as pool:
        again = pool.submit(stack.cli, "publish", third_file)
        resumed["stop_app 20s"] = consuming_again(stack, probes[1], "probe-stopped")
        assert f"published {len(third)} events" in again.result().stdout
    stack.send(publisher.refused)
    valid = events + probes
    chaos.drain(stack, len({e["event_id"] for e in valid}), timeout=120)
    settings = Settings(broker_url=url, queue=stack.queue)
    backlog = queue_lengths(settings)  # health's backlog figure, read over AMQP
    assert set(backlog.values()) == {0}, backlog
    dead = [w for w in workers if not w.alive()]
    assert not dead, "\n".join(f"{w.name} exited:\n{w.output()[-6000:]}" for w in dead)
    chaos.finish(
        stack,
        valid,
        fault="RabbitMQ: connections closed by the broker; broker app stopped 20 s",
        injected=f"rabbitmqctl close_all_connections on the test's vhost ({closed} connections: "
        "workers, beat, publisher, monitor) mid-publish; later rabbitmqctl stop_app, "
        f"{STOPPED:g} s, start_app",
        times=2,
        events_in=len(events) + len(probes),
        monitor=monitor.stop(),
        extra={
            "broker": "amqp (RabbitMQ), publisher confirms on",
            "connections_closed": closed,
            "app_stopped_seconds": stopped_for,
            "seconds_until_consuming_again": resumed,
            "publisher_batches_refused_when_closed": len(publisher.errors),
            "publisher_errors_when_closed": sorted(set(publisher.errors)),
            "publisher_events_confirmed_when_closed": len(publisher.confirmed),
            "publish_while_stopped": f"raised {refused.typename}",
            "cli_publish_while_stopped": f"exit {cli.returncode}: {cli.stderr.splitlines()[0]}",
            "events_published_again_after_start": len(third) + len(publisher.refused),
            "queue_lengths_after_drain": backlog,
            "celery_task_events_scanned": monitor.task_events(),
        },
    )
