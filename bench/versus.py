"""This checkout's ingest against another commit's, on the same machine, interleaved.

``python -m bench.versus REV [--repeat 3] [--events 200000]`` checks REV out in a temporary git
worktree and runs ``bench.ingest --only-batched`` alternately in it and in this checkout
(REV, this, this, REV, REV, this, ...; ``--repeat`` runs of each). Each run is the whole of its
own tree: its migrations, its worker, its publisher, its benchmark, on a fresh database, with
its totals checked against the oracle. Alternating cancels the drift of a machine whose other
load changes over minutes, which a before-then-after pair would read as a speed-up or a loss.

It reports every run's events/s and CPU per event by part, the means and their ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from statistics import mean, median
from typing import Any

from bench.common import ROOT, Report

RESULT = Path("bench") / "results" / "ingest-batched-latest.json"


def run_in(tree: Path, args: argparse.Namespace) -> dict[str, Any]:
    """One ``bench.ingest --only-batched`` in ``tree``; its result row and notes."""
    argv = [sys.executable, "-m", "bench.ingest", "--only-batched", "--events", str(args.events)]
    env = {**os.environ, "PYTHONPATH": str(tree)}
    subprocess.run(argv, cwd=tree, env=env, check=True, stdout=subprocess.DEVNULL)
    payload = json.loads((tree / RESULT).read_text())
    return dict(payload["rows"][0]) | {"notes": payload["notes"]}


def git(*args: str) -> str:
    """What ``git ARGS`` prints in this checkout, stripped."""
    done = subprocess.run(["git", *args], cwd=ROOT, check=True, text=True, capture_output=True)
    return done.stdout.strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("rev", help="the commit to compare this checkout with (e.g. HEAD~1)")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--events", type=int, default=200_000)
    args = parser.parse_args()
    rev = git("rev-parse", "--short", args.rev)
    head = git("rev-parse", "--short", "HEAD")
    dirty = git("status", "--porcelain", "--untracked-files=no")
    this = f"{head}{' + changes' if dirty else ''}"
    report = Report("ingest-versus", vars(args) | {"rev": rev, "this": this})
    rates: dict[str, list[float]] = {rev: [], this: []}
    with tempfile.TemporaryDirectory(prefix="acc-versus-") as tmp:
        other = Path(tmp) / "tree"
        git("worktree", "add", "--detach", "-q", str(other), rev)
        try:
            for i in range(args.repeat * 2):
                name, tree = (rev, other) if i % 4 in (0, 3) else (this, ROOT)
                row = run_in(tree, args)
                rates[name].append(row["events_per_s"])
                notes = row.pop("notes")
                for drop in ("phase", "setup", "events", "seconds"):
                    row.pop(drop, None)
                report.row(run=i + 1, commit=name, **row)
                report.note(f"run {i + 1} ({name}): " + "; ".join(notes))
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(other)], cwd=ROOT)
    ratio = round(mean(rates[this]) / mean(rates[rev]), 2)
    report.target(f"{this} / {rev}, mean events/s", ratio, ">= 2.5", ratio >= 2.5)
    report.note(
        f"mean events/s: {this} {mean(rates[this]):,.0f}, {rev} {mean(rates[rev]):,.0f}; "
        f"medians {median(rates[this]):,.0f} and {median(rates[rev]):,.0f}"
    )
    report.save()


if __name__ == "__main__":
    main()
