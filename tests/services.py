"""Real services for the tests: start Redis and PostgreSQL when they are down, make databases."""

from __future__ import annotations

import subprocess
import time
import uuid
from pathlib import Path

import amqp
import psycopg
import redis

REDIS_URL = "redis://127.0.0.1:6379/0"
AMQP_URL = "amqp://guest:guest@127.0.0.1:5672//"
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
    """RabbitMQ on 127.0.0.1:5672 (guest/guest): its app started again if a test left it stopped,
    else the server started (``rabbitmq-server -detached``, then the service); waits up to 60 s."""

    def connect() -> None:
        conn = amqp.Connection("127.0.0.1:5672", "guest", "guest", connect_timeout=3)
        conn.connect()
        conn.close()

    try:
        connect()
    except Exception:
        for argv in (
            ["rabbitmqctl", "start_app"],
            ["rabbitmq-server", "-detached"],
            ["service", "rabbitmq-server", "start"],
        ):
            try:
                subprocess.run(argv, check=False, capture_output=True, timeout=60)
            except (OSError, subprocess.TimeoutExpired):
                continue
            try:
                _wait(connect, "rabbitmq", timeout=20)
                break
            except RuntimeError:
                continue
        _wait(connect, "rabbitmq", timeout=60)
    return AMQP_URL


def create_database() -> tuple[str, str]:
    """A fresh, empty database; returns (name, SQLAlchemy URL)."""
    name = f"acc_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return name, f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"


def drop_database(name: str) -> None:
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
