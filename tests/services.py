"""Real services for the tests: start Redis and PostgreSQL when they are down, make databases."""

from __future__ import annotations

import fcntl
import hashlib
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlsplit

import amqp
import psycopg
import redis

REDIS_URL = "redis://127.0.0.1:6379/0"
AMQP_URL = "amqp://guest:guest@127.0.0.1:5672//"
#: Present while a test keeps RabbitMQ's app stopped on purpose (tests/rabbitmq.py): others wait.
RABBITMQ_STOPPED = Path(tempfile.gettempdir()) / "accumsync-tests-rabbitmq-stopped"
PG_ADMIN = "postgresql://postgres@127.0.0.1:5432/postgres"


def _wait(check: object, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            check()  # type: ignore[operator]
            return
        except Exception:
            time.sleep(0.3)
    raise RuntimeError(f"{what} did not come up within {timeout}s")


def ensure_redis() -> str:
    """Redis on 127.0.0.1:6379, started without persistence if it is not running."""
    client = redis.Redis.from_url(REDIS_URL)
    try:
        client.ping()
    except redis.ConnectionError:
        subprocess.run(
            [
                "redis-server",
                "--daemonize",
                "yes",
                "--bind",
                "127.0.0.1",
                "--port",
                "6379",
                "--save",
                "",
                "--appendonly",
                "no",
            ],
            check=True,
        )
        _wait(client.ping, "redis")
    return REDIS_URL


def ensure_postgres() -> str:
    """PostgreSQL on 127.0.0.1:5432 (trust auth), started with pg_ctlcluster if it is down."""

    def connect() -> None:
        psycopg.connect(PG_ADMIN, connect_timeout=3).close()

    try:
        connect()
    except psycopg.OperationalError:
        version = sorted(p.name for p in Path("/etc/postgresql").iterdir())[-1]
        subprocess.run(
            ["pg_ctlcluster", "--skip-systemctl-redirect", version, "main", "start"], check=False
        )
        _wait(connect, "postgres")
    return PG_ADMIN


def ensure_rabbitmq() -> str:
    """RabbitMQ on 127.0.0.1:5672 (guest/guest). If it is down (and no test holds it stopped on
    purpose), its app is started again (a test may have left it stopped), else the server
    (``rabbitmq-server -detached``, then the service); each given 20 s, the whole 60 s more."""
    if _amqp_up():
        return AMQP_URL
    _wait(_not_stopped_on_purpose, "a test's stop of rabbitmq", timeout=120)
    for argv in (
        ["rabbitmqctl", "start_app"],
        ["rabbitmq-server", "-detached"],
        ["service", "rabbitmq-server", "start"],
    ):
        if _amqp_up():
            break
        try:
            subprocess.run(argv, check=False, capture_output=True, timeout=60)
        except (OSError, subprocess.TimeoutExpired):
            continue
        _wait_quietly(_amqp_up, 20)
    _wait_quietly(_amqp_up, 60)
    if not _amqp_up():
        raise RuntimeError("rabbitmq did not come up within 60s")
    return AMQP_URL


def _amqp_up() -> bool:
    try:
        conn = amqp.Connection("127.0.0.1:5672", "guest", "guest", connect_timeout=3)
        conn.connect()
        conn.close()
    except Exception:
        return False
    return True


def _wait_quietly(check: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not check() and time.monotonic() < deadline:
        time.sleep(0.5)


def _not_stopped_on_purpose() -> None:
    """Raise while a test (not a crashed one: 2 minutes at most) holds RabbitMQ stopped."""
    if RABBITMQ_STOPPED.exists() and time.time() - RABBITMQ_STOPPED.stat().st_mtime < 120:
        raise RuntimeError("rabbitmq is stopped by a test")


def create_database() -> tuple[str, str]:
    """A fresh, empty database; returns (name, SQLAlchemy URL)."""
    name = f"acc_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return name, database_url(name)


def database_url(name: str) -> str:
    """The SQLAlchemy URL of database ``name`` on the tests' Postgres."""
    return f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"


def drop_database(name: str) -> None:
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def migrated(url: str) -> None:
    """Bring the store at ``url`` to the migrations' head, as ``accumsync db upgrade`` does.

    A store not made yet (a database of :func:`create_database` nothing has used, a SQLite file
    not there) becomes a copy of one that ``worker.db.upgrade`` made once per schema on this
    machine: that saves the second of CPU a command's process costs in imports, which a test run
    of ~80 stacks spent on every one. A store in use is upgraded in place. The command itself is
    run by the tests of migrations and ingest (tests/integration/test_ingest.py)."""
    parts = urlsplit(url)
    if url.startswith("sqlite"):
        target = Path(parts.path.removeprefix("/"))
        if target.exists():
            _upgrade(url)
            return
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(_sqlite_head(), target)
        return
    if (parts.hostname, parts.port) != ("127.0.0.1", 5432):  # a server of the test's own
        _upgrade(url)
        return
    name = parts.path.lstrip("/")
    with psycopg.connect(PG_ADMIN.rsplit("/", 1)[0] + f"/{name}") as conn:
        used = conn.execute(
            "SELECT count(*) FROM pg_class WHERE relnamespace = 'public'::regnamespace"
        )
        if used.fetchone() != (0,):
            _upgrade(url)
            return
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE "{name}"')  # refused if anyone uses it: nothing is lost
        conn.execute(f'CREATE DATABASE "{name}" TEMPLATE "{_postgres_head()}"')


def _schema_digest() -> str:
    """A digest of every migration file: another schema gets another template."""
    from worker.db import MIGRATIONS

    files = sorted((MIGRATIONS / "versions").glob("*.py"))
    return hashlib.sha256(b"".join(f.read_bytes() for f in files)).hexdigest()[:12]


def _sqlite_head() -> Path:
    path = Path(tempfile.gettempdir()) / f"accumsync-tests-head-{_schema_digest()}.db"
    with (path.with_suffix(".lock")).open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not path.exists():
            building = path.with_suffix(f".{uuid.uuid4().hex[:8]}")
            _upgrade(f"sqlite:///{building}")
            building.rename(path)
    return path


def _postgres_head() -> str:
    name = f"acc_head_{_schema_digest()}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute("SELECT pg_advisory_lock(hashtext('accumsync-tests-head'))")
        made = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone()
        if not made:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}_building" WITH (FORCE)')
            conn.execute(f'CREATE DATABASE "{name}_building"')
            _upgrade(database_url(f"{name}_building"))
            conn.execute(f'ALTER DATABASE "{name}_building" RENAME TO "{name}"')
    return name


def _upgrade(url: str) -> None:
    """``worker.db.upgrade`` in a process of its own: alembic configures logging, and the
    test process keeps its own."""
    code = "import sys; from worker.db import upgrade; upgrade(sys.argv[1])"
    subprocess.run([sys.executable, "-c", code, url], check=True, capture_output=True)
