"""Child processes (worker, beat, sandbox) for the demo and the tests: start, await, stop.

Each child writes its output to a log file; ``ready`` waits for a line that says it is serving.
Stopping sends SIGTERM (Celery's warm shutdown) and escalates to SIGKILL after a grace period.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

CELERY = [sys.executable, "-m", "celery", "-A", "worker"]


class ChildFailed(RuntimeError):
    """A child process exited or did not become ready in time."""


class Child:
    """One child process with its log file."""

    def __init__(self, name: str, argv: Sequence[str], env: Mapping[str, str], log: Path) -> None:
        self.name, self.argv, self.env, self.log_path = name, list(argv), dict(env), log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Child:
        """Start (or restart) the process, appending to its log."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                self.argv,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None, f"{self.name} was not started"
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def output(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def ready(self, marker: str, timeout: float = 60.0, after: int = 0) -> Child:
        """Wait until ``marker`` appears in the log (past offset ``after``)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if marker in self.output()[after:]:
                return self
            if not self.alive():
                raise ChildFailed(f"{self.name} exited:\n{self.output()[-3000:]}")
            time.sleep(0.1)
        raise ChildFailed(f"{self.name} not ready after {timeout}s:\n{self.output()[-3000:]}")

    def stop(self, grace: float = 20.0) -> int | None:
        """SIGTERM the process, then SIGKILL what is left of its group (after ``grace`` seconds
        at most); returns the exit code.

        Only the process itself gets the SIGTERM, as ``docker stop`` and systemd's
        ``KillMode=mixed`` do. A Celery worker then shuts down warm: its pool processes finish
        their tasks and fold what they recorded. A SIGTERM to the whole group reached the pool
        processes too, and one in the middle of its task died there (``WorkerLostError``): its
        message came back and its batch waited for another process's fold."""
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        with contextlib.suppress(ProcessLookupError):
            self.proc.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(grace)
        self.kill()  # waits for the process: its exit code is known either way
        return self.proc.returncode

    def kill(self) -> None:
        """SIGKILL the whole process group (pool children included): a crash, not a shutdown."""
        self._signal(signal.SIGKILL)
        if self.proc is not None:
            self.proc.wait(10)

    def _signal(self, sig: signal.Signals) -> None:
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, sig)


#: A worker neither syncs with the others at start (mingle: a second's wait for replies, for
#: revoked task ids we never use) nor follows their events (gossip); its heartbeat, which Flower
#: reads, stays. compose runs its workers so too.
QUIET_WORKER = ["--without-gossip", "--without-mingle"]


def worker_argv(
    name: str, concurrency: int = 1, queues: Sequence[str] = (), pool: str = "prefork"
) -> list[str]:
    """argv of ``celery -A worker worker`` with a unique node name; without ``queues`` it
    consumes both of its environment's queues (ingest and flush)."""
    argv = [*CELERY, "worker", "-n", f"{name}@%h", "-c", str(concurrency), "-l", "INFO"]
    argv += QUIET_WORKER
    return argv + ["-P", pool] + (["-Q", ",".join(queues)] if queues else [])


def dispatch_argv() -> list[str]:
    """argv of ``accumsync dispatch`` (the console script beside this Python)."""
    return [str(Path(sys.executable).parent / "accumsync"), "dispatch"]


def beat_argv(schedule_file: Path) -> list[str]:
    """argv of ``celery -A worker beat`` keeping its schedule state in ``schedule_file``."""
    return [*CELERY, "beat", "-l", "INFO", "-s", str(schedule_file)]


def wait_for(check: Callable[[], bool], timeout: float, interval: float = 0.2) -> bool:
    """Poll ``check`` until it is true or ``timeout`` passes; returns its last answer."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(interval)
    return check()
