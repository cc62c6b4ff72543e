"""The benchmarks' producer: publish a JSON file of events from a process of its own.

``python -m bench.publish FILE --task accumsync.ingest --batch 500`` loads the events first, then
prints the wall-clock time of the first publish and of the last (``t0=`` / ``t1=``), so the
benchmark times "first publish to last commit" without counting the load, and the CPU
seconds it spent publishing (``cpu=``). Settings come from the
environment (``ACCUMSYNC_BROKER_URL``, ``ACCUMSYNC_QUEUE``), as for any producer.
``--batch 1`` with ``--task bench.naive_ingest`` sends one message per event (the baseline).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("file", type=Path)
    parser.add_argument("--task", default="accumsync.ingest")
    parser.add_argument("--batch", type=int, default=500)
    args = parser.parse_args()
    events = json.loads(args.file.read_text())

    from worker.celery import app
    from worker.ingest.producer import publish

    with app.connection_for_write() as conn:
        conn.ensure_connection()
    t0, cpu0 = time.time(), time.process_time()
    if args.task == "accumsync.ingest":
        publish(events, args.batch)
    else:
        with app.producer_or_acquire() as producer:
            for event in events:
                app.send_task(args.task, args=[event], argsrepr="(1 event)", producer=producer)
    print(f"t0={t0:.6f} t1={time.time():.6f} cpu={time.process_time() - cpu0:.3f}", flush=True)


if __name__ == "__main__":
    main()
