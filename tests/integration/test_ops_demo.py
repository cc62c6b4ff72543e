"""``accumsync demo`` as a newcomer runs it: embedded defaults, the real console script.

Both tests run the installed console script in a clean environment (no ACCUMSYNC_* variables) and
find the demo's processes afterwards by the ACCUMSYNC_HOME in their environment, so a pool child
the demo never saw directly still counts.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.stack import ACCUMSYNC
from worker.demo.procs import wait_for

pytestmark = pytest.mark.integration


def demo_argv(*args: str) -> list[str]:
    """The README's demo command (``make demo`` runs ``accumsync demo``) with test-size flags."""
    return [ACCUMSYNC, "demo", *args]


def clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ACCUMSYNC_")}
    return env | {"COLUMNS": "200", "PYTHONUNBUFFERED": "1"}


def processes_of(home: Path) -> list[int]:
    """Live processes whose environment names ``home`` as ACCUMSYNC_HOME."""
    marker = f"ACCUMSYNC_HOME={home}\0".encode()
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if marker in (proc / "environ").read_bytes():
                    found.append(int(proc.name))
            except OSError:
                continue
    return found


def test_demo_verifies_and_leaves_nothing_running(tmp_path: Path) -> None:
    """The demo publishes, flushes, verifies to the cent, prints its summary and exits 0."""
    home = tmp_path / "home"
    argv = demo_argv("--events", "1500", "--members", "60", "--home", str(home))
    proc = subprocess.run(argv, env=clean_env(), capture_output=True, text=True, timeout=240)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output + _logs(home)
    assert "verified: " in output and "NOT verified" not in output
    assert "published 1500 events" in output and "events/s" in output
    assert "invalid 6" in output and "dead letters: 6 invalid events" in output
    # One batch call per pair (60), more when a beat tick finds a pair whose events are still
    # arriving (a loaded machine: ingest spans a tick) and flushes it again: never fewer.
    calls = re.search(r"batch calls (\d+);", output)
    assert calls is not None and int(calls.group(1)) >= 60 and "x 201" in output, output
    assert processes_of(home) == []


def test_ctrl_c_stops_every_child(tmp_path: Path) -> None:
    """SIGINT mid-run: the demo stops sandbox, worker (and its pool) and beat, then exits 130."""
    home = tmp_path / "home"
    log = tmp_path / "demo.out"
    argv = demo_argv("--events", "5000", "--home", str(home))
    with log.open("wb") as out:
        proc = subprocess.Popen(argv, env=clean_env(), stdout=out, stderr=subprocess.STDOUT)
    try:
        assert wait_for(lambda: "started sandbox" in log.read_text(), 120, 0.2), log.read_text()
        assert len(processes_of(home)) >= 4  # sandbox, worker, its pool process, beat
        time.sleep(1)  # publishing and ingesting
        proc.send_signal(signal.SIGINT)
        assert proc.wait(60) == 130, log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert "every child process was stopped" in log.read_text()
    deadline = time.monotonic() + 5
    while processes_of(home) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert processes_of(home) == []


def _logs(home: Path) -> str:
    return "".join(p.read_text()[-2000:] for p in sorted((home / "logs").glob("*.log")))
