"""The benchmarks' producer: publish a JSON file of events from a process of its own.

``python -m bench.publish FILE --task accumsync.ingest [--batch N]`` loads the events first, then
prints the wall-clock time of the first publish and of the last (``t0=`` / ``t1=``), so the
benchmark times "first publish to last commit" without counting the load, and the CPU
seconds it spent publishing (``cpu=``). Settings come from the
environment (``ACCUMSYNC_BROKER_URL``, ``ACCUMSYNC_QUEUE``), as for any producer.
``--batch`` is the events per message (default: the product's, ACCUMSYNC_INGEST_BATCH_SIZE);
``--task bench.naive_ingest`` sends one message per event (the baseline).
``--rate R`` paces the batches at R events/s (batch k leaves at t0 + k * batch / R): it prints
``started t0=...`` as the first one leaves, and at the end how late the latest batch left
(``late_max=`` seconds behind its schedule), so a publisher starved of CPU shows.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("file", type=Path)
    parser.add_argument("--task", default="accumsync.ingest")
    parser.add_argument("--batch", type=int, help="events per message [default: the product's]")
    parser.add_argument("--rate", type=float, default=0.0, help="events/s; 0: as fast as it can")
    args = parser.parse_args()
    events = json.loads(args.file.read_text())

    from worker.celery import app
    from worker.ingest.producer import publish
    from worker.settings import get_settings

    with app.connection_for_write() as conn:
        conn.ensure_connection()
    t0, cpu0 = time.time(), time.process_time()
    if args.rate > 0:
        late = paced(events, args.batch or get_settings().ingest_batch_size, args.rate, t0)
        print(f"t0={t0:.6f} t1={time.time():.6f} cpu={time.process_time() - cpu0:.3f}", end="")
        print(f" late_max={late:.3f}", flush=True)
        return
    if args.task == "accumsync.ingest":
        publish(events, args.batch)
    else:
        with app.producer_or_acquire() as producer:
            for event in events:
                app.send_task(args.task, args=[event], argsrepr="(1 event)", producer=producer)
    print(f"t0={t0:.6f} t1={time.time():.6f} cpu={time.process_time() - cpu0:.3f}", flush=True)


def paced(events: list[Any], batch: int, rate: float, t0: float) -> float:
    """Publish ``events`` in messages of ``batch`` at ``rate`` events/s from ``t0``; the most
    seconds a message left behind its schedule."""
    from worker.ingest.producer import batches, publish

    print(f"started t0={t0:.6f}", flush=True)
    late = 0.0
    for k, part in enumerate(batches(events, batch)):
        due = t0 + k * batch / rate
        wait = due - time.time()
        if wait > 0:
            time.sleep(wait)
        else:
            late = max(late, -wait)
        publish(part, batch)
    return late


if __name__ == "__main__":
    main()
