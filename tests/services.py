"""Real services for the tests: start Redis and PostgreSQL when they are down, make databases."""

from __future__ import annotations

import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path

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
    return name, f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"


def drop_database(name: str) -> None:
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
