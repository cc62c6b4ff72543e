"""A PostgreSQL server of the test's own: safe to restart, stop and crash while others' tests use
the shared cluster.

    pg = PrivatePostgres().start()      # initdb (first time) and start, on a free port
    engine = make_engine(pg.url)        # postgresql+psycopg://postgres@127.0.0.1:PORT/postgres
    pg.restart("fast")                  # pg_ctl restart -m fast
    pg.stop("immediate"); pg.start()    # a crash (no shutdown checkpoint), then recovery
    pg.close()                          # stop (immediate) and delete the data directory

The cluster lives in a fresh directory under the system's temp dir (a pytest ``tmp_path`` is
private to root, and the server runs as the ``postgres`` OS user, which initdb requires when we
are root). Auth is trust on loopback only; the Unix socket stays in the data directory, so the
system cluster's socket directory is never touched. ``fsync`` is off: a stopped or crashed
server (what the tests do) loses nothing the kernel already holds, only an OS crash would.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Literal

import psycopg

from worker.demo.sandboxes import free_port

Mode = Literal["smart", "fast", "immediate"]


def bin_dir() -> Path:
    """The newest installed server's bin directory (/usr/lib/postgresql/<version>/bin)."""
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"), key=lambda p: int(p.parts[-3]))
    if not found:
        raise RuntimeError("no PostgreSQL server under /usr/lib/postgresql/*/bin")
    return found[-1].parent


class PrivatePostgres:
    """One private cluster: ``start()``, ``stop(mode)``, ``restart(mode)``, ``kill()``,
    ``close()``; ``url`` (SQLAlchemy) and ``port``. Also a context manager (closes on exit)."""

    def __init__(self) -> None:
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="accumsync-pg-"))
        self.data = self.dir / "data"
        self.log_path = self.dir / "server.log"
        self.bin = bin_dir()

    @property
    def url(self) -> str:
        """SQLAlchemy URL of the cluster's ``postgres`` database."""
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"

    @property
    def dsn(self) -> str:
        """libpq URL (for psycopg directly)."""
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def start(self) -> PrivatePostgres:
        """initdb on first use, then start and wait until it accepts connections."""
        if not self.data.exists():
            self._initdb()
        self._pg_ctl("start", "-l", str(self.log_path), "-o", self._options())
        self._wait_ready()
        return self

    def stop(self, mode: Mode = "fast") -> None:
        """``pg_ctl stop -m mode``: ``fast`` rolls back open transactions and disconnects
        everyone, ``immediate`` is a crash (recovery from WAL at the next start)."""
        self._pg_ctl("stop", "-m", mode)

    def restart(self, mode: Mode = "fast") -> None:
        """``pg_ctl restart -m mode``, waiting until it accepts connections again."""
        self._pg_ctl("restart", "-m", mode, "-l", str(self.log_path), "-o", self._options())
        self._wait_ready()

    def kill(self) -> None:
        """A crash: ``stop("immediate")``."""
        self.stop("immediate")

    def running(self) -> bool:
        return self._pg_ctl("status", check=False).returncode == 0

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def close(self) -> None:
        """Stop (immediately, if running) and delete the cluster's directory."""
        if self.data.exists() and self.running():
            self.stop("immediate")
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> PrivatePostgres:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def _options(self) -> str:
        settings = {
            "port": self.port,
            "listen_addresses": "127.0.0.1",
            "unix_socket_directories": str(self.data),
            "fsync": "off",
            "max_connections": 200,
        }
        return " ".join(f"-c {k}={v}" for k, v in settings.items())

    def _initdb(self) -> None:
        os.chown(self.dir, *_postgres_ids())
        argv = [str(self.bin / "initdb"), "-D", str(self.data), "-U", "postgres"]
        argv += ["--auth=trust", "--encoding=UTF8", "--no-sync"]
        self._run(argv, check=True)

    def _pg_ctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self._run([str(self.bin / "pg_ctl"), "-D", str(self.data), "-w", *args], check)

    def _run(self, argv: list[str], check: bool) -> subprocess.CompletedProcess[str]:
        if os.geteuid() == 0:  # the server refuses to run as root
            argv = ["runuser", "-u", "postgres", "--", *argv]
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=120, cwd=self.dir)
        if check and proc.returncode != 0:
            raise RuntimeError(
                f"{' '.join(argv)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}\n"
                f"{self.log()[-2000:]}"
            )
        return proc

    def _wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                psycopg.connect(self.dsn, connect_timeout=3).close()
                return
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    tail = self.log()[-2000:]
                    raise RuntimeError(f"private postgres not ready:\n{tail}") from None
                time.sleep(0.1)


def _postgres_ids() -> tuple[int, int]:
    """uid and gid of the ``postgres`` OS user (or ours, when we are not root)."""
    if os.geteuid() != 0:
        return os.getuid(), os.getgid()
    entry = pwd.getpwnam("postgres")
    return entry.pw_uid, entry.pw_gid


if __name__ == "__main__":
    with PrivatePostgres() as pg:
        pg.start()
        started = time.monotonic()
        pg.restart("fast")
        print(f"{pg.url}: restarted in {time.monotonic() - started:.1f}s")
