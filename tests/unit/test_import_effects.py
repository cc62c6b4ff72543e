"""Importing the documented producer changes nothing outside the import: no file under HOME, no
log handler of ours, kombu's classes as kombu ships them. The app's configuration, read when first
needed, names our broker transports instead of patching kombu's."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

PROBE = """
import json, logging
from kombu.transport import redis, sqlalchemy
stock = (redis.Channel.QoS, sqlalchemy.Transport.Channel, sqlalchemy.Transport.polling_interval)

import worker.ingest.producer
from worker.celery import app

found = {
    "handlers": [type(h).__name__ for h in logging.getLogger("accumsync").handlers],
    "kombu_untouched": stock
    == (redis.Channel.QoS, sqlalchemy.Transport.Channel, sqlalchemy.Transport.polling_interval),
}
if READ_CONF:
    found["transport"] = app.conf.broker_transport
    found["url_scheme"] = app.conf.broker_url.split("://")[0]
print(json.dumps(found))
"""


def python(home: Path, code: str, **env: str) -> str:
    """What ``python -c code`` prints, run with HOME at ``home`` and no ACCUMSYNC_* but ``env``."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("ACCUMSYNC_")}
    clean.update(HOME=str(home), **env)
    done = subprocess.run(
        [sys.executable, "-c", code], env=clean, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def probe(home: Path, read_conf: bool, **env: str) -> dict[str, object]:
    found: dict[str, object] = json.loads(python(home, f"READ_CONF = {read_conf}\n{PROBE}", **env))
    return found


def created(home: Path) -> list[str]:
    return sorted(str(p.relative_to(home)) for p in home.rglob("*"))


def test_importing_the_producer_creates_nothing_and_configures_nothing(tmp_path: Path) -> None:
    found = probe(tmp_path, read_conf=False)
    assert created(tmp_path) == []  # the old import made ~/.accumsync
    assert found == {"handlers": [], "kombu_untouched": True}


@pytest.mark.parametrize(
    ("broker_url", "transport", "scheme"),
    [
        ("", "worker.sqlbroker:Transport", "sqlite"),
        ("redis://127.0.0.1:6379/0", "worker.redisbroker:Transport", "redis"),
        ("amqp://guest:guest@127.0.0.1:5672//", "amqp", "amqp"),
    ],
)
def test_the_configuration_names_our_transports_and_still_creates_nothing(
    tmp_path: Path, broker_url: str, transport: str, scheme: str
) -> None:
    found = probe(tmp_path, read_conf=True, ACCUMSYNC_BROKER_URL=broker_url)
    assert found["transport"] == transport
    assert found["url_scheme"] == scheme
    assert found["kombu_untouched"] is True
    assert created(tmp_path) == []  # the embedded files are made by the first connection


def test_kombu_fetch_names_kombus_own_redis_transport(tmp_path: Path) -> None:
    """``ACCUMSYNC_BROKER_FETCH=kombu``: the way back (and bench.ingest's baseline)."""
    env = {"ACCUMSYNC_BROKER_URL": "redis://127.0.0.1:6379/0", "ACCUMSYNC_BROKER_FETCH": "kombu"}
    assert probe(tmp_path, read_conf=True, **env)["transport"] == "worker.redisstock:Transport"


def test_the_producer_loads_no_store_modules(tmp_path: Path) -> None:
    """A producer publishes to the broker only: its import leaves SQLAlchemy, SQLModel and the
    database drivers out (they cost a publishing process ~0.3 s of CPU to start)."""
    code = (
        "import sys, worker.ingest.producer; "
        "print([m for m in ('sqlalchemy', 'sqlmodel', 'alembic', 'psycopg') if m in sys.modules])"
    )
    assert python(tmp_path, code).strip() == "[]"
