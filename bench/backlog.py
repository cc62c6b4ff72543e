"""A backlog's fold: what catching up costs per event, against the steady fold.

``python -m bench.backlog [--events 40000] [--members 40000] [--batch 500]`` records a
realistic stream of mostly new members (a backfill: nearly every key and pair is new) into a
fresh Postgres database from this process, one transaction per batch, as a worker does, in
several ways:

- steady: each batch folded after its commit (a fold keeping up, one batch at a time);
- backlog: every batch recorded first, then folded by ``fold_committed`` as a worker catching up
  does (folds of up to ``MAX_BATCHES`` batches, each its own transaction).

With ``--every`` (default 4) it also folds after every N-th batch, a cadence between the two.
It reports the fold's time per event in each, and the backlog's ratio to steady: a fold whose
cost grows with the versions it takes, and not with their square, folds a backlog at about the
steady cost or less (bench/README.md, finding 16: the accumulators' insert once rescanned the
new pairs per row, and a backlog fold of 19,000 versions took 17.5 s). Every store's totals are
checked to the cent against the independent oracle. Baseline: the steady fold in the same run.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

from sqlmodel import Session

from bench.common import Report, Run
from tests.stack import Stack, same_totals
from worker.db import make_engine
from worker.demo.streams import StreamSpec, expected_totals, generate
from worker.ingest.store import ingest
from worker.store.fold import fold_committed, in_session_of


def record_and_fold(url: str, events: list[Any], batch: int, every: int) -> tuple[float, int]:
    """Record ``events`` in batches, folding after every ``every``-th batch's commit (0: all of
    them at the end); the fold's seconds in all and the folds' batch counts' maximum."""
    engine = make_engine(url)
    folding, largest = 0.0, 0

    def fold() -> None:
        nonlocal folding, largest
        started = time.perf_counter()
        report = fold_committed(in_session_of(engine))
        folding += time.perf_counter() - started
        largest = max(largest, report.batches)

    for n, start in enumerate(range(0, len(events), batch), start=1):
        with Session(engine) as session:
            ingest(session, events[start : start + batch])
            session.commit()
        if every and n % every == 0:
            fold()
    fold()
    engine.dispose()
    return folding, largest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--events", type=int, default=40_000)
    parser.add_argument("--members", type=int, default=40_000)
    parser.add_argument("--batch", type=int, default=500)
    parser.add_argument(
        "--every",
        type=int,
        nargs="*",
        default=[4],
        help="also fold after every N-th batch, for each N given (the fold's cadence)",
    )
    args = parser.parse_args()
    report = Report("backlog", vars(args))
    events = generate(StreamSpec(events=args.events, members=args.members, groups=5, seed=1))
    oracle = expected_totals(events)
    n = len(events)
    figures: dict[str, float] = {}
    with Run("backlog") as run:
        cadences = {"steady": 1} | {f"every {k} batches": k for k in args.every if k > 1}
        for name, every in (cadences | {"backlog": 0}).items():
            url = run.database()
            seconds, largest = record_and_fold(url, events, args.batch, every)
            exact = not same_totals(Stack(run.tmp, database_url=url).totals(), oracle)
            figures[name] = seconds * 1e6 / n
            report.row(
                fold=name,
                events=n,
                largest_fold_batches=largest,
                fold_seconds=round(seconds, 2),
                fold_us_per_event=round(figures[name], 1),
                totals_exact="yes" if exact else "NO",
            )
    ratio = figures["backlog"] / figures["steady"]
    report.target("backlog fold / steady fold, per event", round(ratio, 2), "<= 1.5", ratio <= 1.5)
    report.save()


if __name__ == "__main__":
    main()
