"""RELIABILITY.md's chaos table from the figures a run wrote: ``python -m tests.chaos.table [DIR]``.

Every scenario's ``Chaos.finish`` writes ``tests/chaos/results/<test>.json``; this prints one
markdown row per file (fault, how injected, times, events in, what became of them, remote equal,
run time) and, below the table, each scenario's other figures, so the document is copied from a
run, not retyped. ``DIR`` defaults to this checkout's results (a CI clone has its own).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from tests.chaos.conftest import RESULTS

#: The columns every scenario writes; the rest are that scenario's own figures.
COMMON = {
    "scenario",
    "fault",
    "injected",
    "times",
    "events_in",
    "distinct_valid_events",
    "events_applied",
    "duplicates",
    "stale",
    "invalid",
    "dead_letters_ingest",
    "dead_letters_flush",
    "keys",
    "remote_equals_expected",
    "run_seconds",
    "vba_calls",
    "leak_scan",
}

HEADER = [
    "| fault | how injected | times | events in | events applied | remote equals expected "
    "| recovery | run time |",
    "|---|---|---|---|---|---|---|---|",
]

#: A scenario's recovery figures, as it names them: (key, how the table says it).
RECOVERY = (
    ("seconds_until_consuming_again", "consuming again after"),
    ("seconds_until_every_sent_event_recorded", "every sent event recorded after"),
    ("seconds_from_last_kill_to_all_confirmed", "all confirmed after the last kill"),
    ("flushed_after_restart_seconds_max", "every waiting pair flushed after the restart"),
    ("health_beat_red_after_seconds", "health red after"),
    ("health_beat_green_after_stop_seconds", "health green after one stopped"),
    ("seconds_paused_worker_drained_backlog_while_full", "backlog drained while full"),
    ("seconds_limit_lifted_to_published", "publishing again after the limit was lifted"),
    ("recovery_seconds_upgrade_to_all_flushed", "all flushed after the upgrade"),
)


def outcome(r: dict[str, Any]) -> str:
    """What became of the events: applied and stale of the distinct valid ones, the rest."""
    dead = r["dead_letters_ingest"] + r["dead_letters_flush"]
    return (
        f"{r['events_applied']} applied + {r['stale']} stale of {r['distinct_valid_events']} "
        f"distinct valid; {r['duplicates']} duplicates; {dead} dead letters"
    )


def recovery(r: dict[str, Any]) -> str:
    """The scenario's recovery times in seconds, or what it timed instead."""
    said = [f"{label} {seconds(r[key])}" for key, label in RECOVERY if key in r]
    return "; ".join(said) or "not timed (run time only)"


def seconds(value: Any) -> str:
    if isinstance(value, dict):
        return ", ".join(f"{seconds(v)} ({k})" for k, v in value.items())
    return f"{value} s"


def row(r: dict[str, Any]) -> str:
    equal = "yes" if r["remote_equals_expected"] else "**no**"
    cells = [r["fault"], r["injected"], r["times"], r["events_in"], outcome(r), equal, recovery(r)]
    return "| " + " | ".join(map(str, cells)) + f" | {r['run_seconds']} s |"


def extras(r: dict[str, Any]) -> str:
    """``**fault**: vba calls ...; each own figure ...; the leak scan``, one line."""
    parts = [f"vba calls: {json.dumps(r['vba_calls'])}"]
    parts += [f"{k.replace('_', ' ')}: {json.dumps(v)}" for k, v in r.items() if k not in COMMON]
    parts.append(f"keys compared: {r['keys']}")
    scan = r.get("leak_scan")
    if scan:
        parts.append(
            f"leak scan: {scan['values']} values over {scan['bytes']} bytes of "
            f"{', '.join(scan['sources'])}: {scan['found']} found"
        )
    return f"- **{r['fault']}**: " + "; ".join(parts)


def main(argv: list[str]) -> int:
    where = Path(argv[0]) if argv else RESULTS
    runs = [json.loads(p.read_text()) for p in sorted(where.glob("*.json"))]
    if not runs:
        print(f"no results in {where}", file=sys.stderr)
        return 2
    runs.sort(key=lambda r: r["run_seconds"], reverse=True)
    print("\n".join([*HEADER, *map(row, runs)]))
    print("\nExtra figures per scenario (same JSON files):\n")
    print("\n".join(map(extras, runs)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
