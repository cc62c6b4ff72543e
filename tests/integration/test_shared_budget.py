"""Without Redis (the embedded defaults), four processes share VBA's budget and token through
the store: VBA (the sandbox) never answers 429, and the fleet logs in once."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from worker.db import upgrade
from worker.demo.sandboxes import running_sandbox

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
RATE, BURST, PROCESSES, CALLS = 25, 50, 4, 300

# One worker process: its VBA client as the flush builds it; n list calls, then its times.
WORKER = """
import json, sys, time
from worker.vba.fleet import client
n = int(sys.argv[1])
vba = client()
print("ready", flush=True)
sys.stdin.readline()
first = time.time()
for _ in range(n):
    vba.list_accumulators("123456789", "GRP-A")
print(json.dumps({"first": first, "last": time.time()}), flush=True)
"""


def test_four_processes_without_redis_share_one_budget_and_one_token(tmp_path: Path) -> None:
    """300 calls from 4 processes on the embedded store: zero 429s, one login, and the rate
    within VBA's bucket. (Before, each process had a bucket and a token of its own: 4 logins,
    and the four bursts together drew 429s.)"""
    url = f"sqlite:///{tmp_path / 'store.db'}"
    upgrade(url)
    with running_sandbox(rate=RATE, burst=BURST, dialect="lax") as sandbox:
        env = {k: v for k, v in os.environ.items() if not k.startswith("ACCUMSYNC_")}
        env |= sandbox.env() | {
            "ACCUMSYNC_HOME": str(tmp_path),
            "ACCUMSYNC_DATABASE_URL": url,
            "ACCUMSYNC_VBA_RATE": str(RATE),
            "ACCUMSYNC_VBA_BURST": str(BURST),
            "PYTHONPATH": str(ROOT),
        }
        workers = [
            subprocess.Popen(
                [sys.executable, "-c", WORKER, str(CALLS // PROCESSES)],
                cwd=ROOT,
                env=env,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
            )
            for _ in range(PROCESSES)
        ]
        for w in workers:
            assert w.stdout is not None and w.stdout.readline().strip() == "ready"
        for w in workers:
            assert w.stdin is not None
            w.stdin.write("go\n")
            w.stdin.flush()
        times = [json.loads(w.communicate(timeout=120)[0]) for w in workers]
        assert [w.returncode for w in workers] == [0] * PROCESSES
        counters = sandbox.admin.counters()
    elapsed = max(t["last"] for t in times) - min(t["first"] for t in times)
    assert counters["by_route"]["accumulators.list"] == {"200": CALLS}
    assert "429" not in counters["by_status"]
    assert counters["by_route"]["auth.login"] == {"200": 1}
    assert (CALLS - BURST) / elapsed <= RATE * 1.02, f"{CALLS} calls in {elapsed:.2f}s"
