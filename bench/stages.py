"""Where one batch's time goes: the store's ingest stages, timed in-process on Postgres.

``python -m bench.stages [--events 40000] [--batch 500]`` ingests a realistic stream into a fresh
Postgres database from this process (no broker, no Celery), one transaction per batch, and times
each stage of ``worker.ingest.store.ingest`` per event (validation, the batch row, the versions'
insert, the stored-hash lookup), then the fold after each batch's commit
(``worker.store.fold``, its own transaction, as a worker runs it). Then the content hash alone,
as shipped against its reference encoder, in the same process. It is the profile
bench/README.md's findings quote as "in-process"; the end-to-end figure is ``bench.ingest``'s.
Baseline: the whole ingest's own time per event (the stages' share).
"""

from __future__ import annotations

import argparse
import hashlib
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

from sqlmodel import Session

import worker.ingest.store as store
from bench.common import Report, Run
from models.events import ClaimEvent
from worker.db import make_engine
from worker.demo.streams import StreamSpec, generate
from worker.store.fold import fold_committed, in_session_of

STAGES = (
    "validate",
    "open_batch",
    "insert_versions",
    "look_up",
    "close_batch",
)


def timed(name: str, spent: Counter[str]) -> Callable[..., Any]:
    """``worker.ingest.store``'s stage ``name``, adding its wall time to ``spent``."""
    stage = getattr(store, name)

    def run(*args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        try:
            return stage(*args, **kwargs)
        finally:
            spent[name] += time.perf_counter() - started

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--events", type=int, default=40_000)
    parser.add_argument("--batch", type=int, default=500)
    parser.add_argument("--members", type=int, default=20_000)
    args = parser.parse_args()
    report = Report("stages", vars(args))
    events = generate(StreamSpec(events=args.events, members=args.members, groups=5, seed=1))
    spent: Counter[str] = Counter()
    for name in STAGES:
        setattr(store, name, timed(name, spent))
    with Run("stages") as run:
        engine = make_engine(run.database())
        started = time.perf_counter()
        for i in range(0, len(events), args.batch):
            with Session(engine) as session:
                store.ingest(session, events[i : i + args.batch])
                commit = time.perf_counter()
                session.commit()
                spent["commit"] += time.perf_counter() - commit
            folding = time.perf_counter()
            fold_committed(in_session_of(engine))
            spent["fold (its own transaction)"] += time.perf_counter() - folding
        total = time.perf_counter() - started
        engine.dispose()
    n = len(events)
    for name, seconds in spent.most_common():
        report.row(
            stage=name,
            us_per_event=round(seconds * 1e6 / n, 1),
            share_of_ingest=f"{seconds / total:.0%}",
        )
    report.row(
        stage="whole ingest and fold",
        us_per_event=round(total * 1e6 / n, 1),
        share_of_ingest="100%",
    )
    report.note(f"{n:,} events in {total:.2f} s: {n / total:,.0f} events/s in one process")
    fast, encoder = hash_costs(events)
    report.note(
        f"content hash: {fast:.2f} us/event through pydantic-core, {encoder:.2f} through json's "
        f"encoder (its reference, the same bytes): {encoder / fast:.2f}x"
    )
    report.save()


def hash_costs(events: list[Any], rounds: int = 5) -> tuple[float, float]:
    """The content hash's cost per event, us: as shipped, and by the reference encoder
    (ClaimEvent.canonical_json), in alternating rounds; the best round of each."""
    models = [ClaimEvent.model_validate(e) for e in events if isinstance(e, dict)]
    timings: dict[str, list[float]] = {"fast": [], "encoder": []}
    ways: dict[str, Callable[[ClaimEvent], str]] = {
        "fast": ClaimEvent.content_hash,
        "encoder": lambda m: hashlib.sha256(m.canonical_json().encode()).hexdigest(),
    }
    for _ in range(rounds):
        for name, way in ways.items():
            started = time.perf_counter()
            for model in models:
                way(model)
            timings[name].append((time.perf_counter() - started) * 1e6 / len(models))
    return min(timings["fast"]), min(timings["encoder"])


if __name__ == "__main__":
    main()
