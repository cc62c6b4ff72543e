"""Four worker processes share the Redis token bucket: VBA (the sandbox) never answers 429."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from redis import Redis

from worker.demo.sandboxes import running_sandbox

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
RATE, BURST, PROCESSES, CALLS = 25, 50, 4, 500
REDIS_URL = "redis://127.0.0.1:6379/12"

# One worker process: n list calls through the shared bucket; prints its first and last call times.
WORKER = """
import json, sys, time
from worker.settings import Settings
from worker.vba import VbaClient
n = int(sys.argv[1])
with VbaClient(Settings()) as client:
    client.auth.token()
    print("ready", flush=True)
    sys.stdin.readline()
    first = time.time()
    for _ in range(n):
        client.list_accumulators("123456789", "GRP-A")
    print(json.dumps({"first": first, "last": time.time()}), flush=True)
"""


def test_four_processes_share_one_bucket() -> None:
    """500 calls from 4 processes: zero 429s, and the rate stays within VBA's bucket."""
    Redis.from_url(REDIS_URL).flushdb()
    with running_sandbox(rate=RATE, burst=BURST, dialect="lax") as sandbox:
        env = (
            os.environ
            | sandbox.env()
            | {
                "ACCUMSYNC_REDIS_URL": REDIS_URL,
                "ACCUMSYNC_VBA_RATE": str(RATE),
                "ACCUMSYNC_VBA_BURST": str(BURST),
                "PYTHONPATH": str(ROOT),
            }
        )
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
        times = [json.loads(w.communicate(timeout=60)[0]) for w in workers]
        assert [w.returncode for w in workers] == [0] * PROCESSES
        counters = sandbox.admin.counters()
    elapsed = max(t["last"] for t in times) - min(t["first"] for t in times)
    assert counters["by_route"]["accumulators.list"] == {"200": CALLS}
    assert "429" not in counters["by_status"]
    assert counters["by_route"]["auth.login"] == {"200": 1}
    # The bucket allows BURST at once, then RATE per second: the measured rate may not beat it.
    assert (CALLS - BURST) / elapsed <= RATE * 1.02, f"{CALLS} calls in {elapsed:.2f}s"
    # ...and the shared bucket is not needlessly slow either.
    assert elapsed < (CALLS - BURST) / RATE * 1.25
