"""Fixtures shared by every suite: real Redis and PostgreSQL, fresh databases, running stacks."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import settings

from tests.services import (
    create_database,
    drop_database,
    ensure_postgres,
    ensure_rabbitmq,
    ensure_redis,
)
from tests.stack import Stack

# No hypothesis deadline: its 200 ms default is a timed assertion, and it fails pure-logic tests
# at random on a loaded 2-core machine (two test lanes, worker processes) without finding a bug.
settings.register_profile("accumsync", deadline=None)
settings.load_profile("accumsync")

#: Tests that run one at a time on one xdist worker (``make test`` runs two): every chaos scenario
#: (they kill, stop, restart and fill shared services, close every RabbitMQ connection, and time
#: recoveries) and every test on RabbitMQ (its app is stopped by one of them; their ids say amqp).
EXCLUSIVE = pytest.mark.xdist_group("exclusive")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "chaos" in item.path.parts or "amqp" in item.nodeid:
            item.add_marker(EXCLUSIVE)


@pytest.fixture(scope="session")
def redis_url() -> str:
    """Redis on loopback, started if it is down."""
    return ensure_redis()


@pytest.fixture(scope="session")
def amqp_url() -> str:
    """RabbitMQ on loopback (guest/guest, vhost /), started if it is down."""
    return ensure_rabbitmq()


@pytest.fixture(scope="session")
def postgres() -> str:
    """PostgreSQL on loopback, started if it is down."""
    return ensure_postgres()


@pytest.fixture
def pg_url(postgres: str) -> Iterator[str]:
    """A fresh PostgreSQL database for one test, dropped afterwards."""
    name, url = create_database()
    yield url
    drop_database(name)


@pytest.fixture
def make_stack(tmp_path: Path) -> Iterator[Callable[..., Stack]]:
    """Build stacks (``make_stack(database_url=..., broker_url=...)``); all stopped at teardown."""
    stacks: list[Stack] = []

    def make(**kwargs: str) -> Stack:
        stack = Stack(tmp_path / f"stack{len(stacks)}", **kwargs)
        stacks.append(stack)
        return stack

    yield make
    for stack in stacks:
        stack.close()
