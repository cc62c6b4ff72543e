"""Worker memory: RSS of one worker process while it ingests 1,000,000 events, flat or not.

``python -m bench.memory [--events 1000000]``: one ``celery -A worker worker -c 1`` (one pool
process does all the work) ingests a realistic stream from Redis into Postgres; the stream is
generated and published in segments of 50,000 (fresh claim and event ids per segment, the same
20,000 members) with at most 100,000 events queued, so neither the publisher nor Redis holds it
all. The pool process's RSS is read from /proc at 10%, 25%, 50% and 100% of the events; its
own first reading (after 10,000) is the baseline the later ones are compared with.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Iterator
from typing import Any

from bench.common import Report, Run, events_ingested, pool_pids, producer_app, rss_mb, store
from worker.demo.streams import StreamSpec, generate

SEGMENT = 50_000
IN_FLIGHT = 100_000


def segments(total: int, members: int) -> Iterator[list[dict[str, Any]]]:
    """The stream in segments; ids are prefixed per segment so each one is new."""
    for n, start in enumerate(range(0, total, SEGMENT)):
        size = min(SEGMENT, total - start)
        events = generate(StreamSpec(events=size, members=members, groups=5, seed=100 + n))
        for e in events:
            e["event_id"] = f"m{n}-{e['event_id']}"
            e["claim_id"] = f"m{n}-{e['claim_id']}"
        yield events


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--members", type=int, default=20_000)
    args = parser.parse_args()
    report = Report("memory", vars(args))
    marks = sorted({10_000, *(int(args.events * f) for f in (0.1, 0.25, 0.5, 1.0))})
    readings: list[dict[str, Any]] = []

    with Run("memory") as run:
        url = run.database()
        env = run.env(url)
        child = run.worker(env, 1, name="mem")
        pid = pool_pids(child.pid)[0]
        idle = rss_mb(pid)[0]
        from worker.ingest.producer import publish

        producer_app(env)
        published = 0
        with store(url) as engine:
            for events in segments(args.events, args.members):
                while published - events_ingested(engine) > IN_FLIGHT - SEGMENT:
                    readings += read_marks(engine, pid, marks, readings, published)
                published += publish(events)
                readings += read_marks(engine, pid, marks, readings, published)
            while marks[len(readings) :]:
                readings += read_marks(engine, pid, marks, readings, published)
        assert pool_pids(child.pid) == [pid], "the pool process was replaced during the run"

    base = readings[0]["rss_mb"]
    for r in readings:
        report.row(**r, vs_first=f"{r['rss_mb'] / base:.2f}x")
    peak = max(r["peak_rss_mb"] for r in readings)
    growth = readings[-1]["rss_mb"] - base
    report.target("peak RSS of the worker process (MB)", peak, "<= 250", peak <= 250)
    flat = growth <= 0.1 * base
    report.target("RSS growth from the first reading (MB)", round(growth, 1), "flat", flat)
    report.note(f"pool process idle RSS before the first event: {idle} MB")
    report.note("one prefork pool process (-c 1); RSS and peak (VmHWM) from /proc/PID/status")
    report.save()


def read_marks(
    engine: Any, pid: int, marks: list[int], done: list[dict[str, Any]], published: int
) -> list[dict[str, Any]]:
    """Readings for the marks the ingest has passed since the last call (waits a little)."""
    time.sleep(0.2)
    ingested = events_ingested(engine)
    out = []
    for mark in marks[len(done) :]:
        if ingested < mark:
            break
        rss, peak = rss_mb(pid)
        out.append({"events_ingested": ingested, "mark": mark, "rss_mb": rss, "peak_rss_mb": peak})
    return out


if __name__ == "__main__":
    main()
