"""Fixtures of the integration suites: sandboxes, and stacks pointed at one."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest
from sqlalchemy import Engine

from tests.chaos.conftest import PrivateRedis
from tests.stack import Stack
from worker import redisbroker, redisstock
from worker.db import make_engine, upgrade
from worker.demo.sandboxes import SandboxHandle, running_sandbox

FAST_RETRIES = {"backoff_base": "0.1", "backoff_max": "1", "max_attempts": "200"}


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[PrivateRedis]:
    """A redis-server of the test's own: its memory limit and its network are the test's."""
    server = PrivateRedis(tmp_path).start()
    try:
        yield server
    finally:
        server.kill()


@pytest.fixture(params=[redisbroker.Transport, redisstock.Transport], ids=["reliable", "kombu"])
def redis_fetch(request: pytest.FixtureRequest) -> type:
    """Each Redis fetch a broker test holds to: the reliable one (the default) and kombu's."""
    return request.param  # type: ignore[no-any-return]


@pytest.fixture
def pg_engine(pg_url: str) -> Iterator[Engine]:
    """An engine on a fresh, migrated PostgreSQL database of the test's own."""
    upgrade(pg_url)
    engine = make_engine(pg_url)
    yield engine
    engine.dispose()


@pytest.fixture
def sandboxes() -> Iterator[Callable[..., SandboxHandle]]:
    """Start sandboxes with flags; all stopped at teardown."""
    with ExitStack() as stack:
        yield lambda **flags: stack.enter_context(running_sandbox(**flags))


@pytest.fixture
def flush_stack(
    make_stack: Callable[..., Stack], redis_url: str, pg_url: str
) -> Callable[..., Stack]:
    """A Redis + Postgres stack pointed at a sandbox, migrated, with short retry timings."""

    def make(sandbox: SandboxHandle, **settings: str) -> Stack:
        env = {"flush_interval": "1", "flush_lease": "5", "vba_timeout": "1.5", "settle_grace": "6"}
        stack = make_stack(
            database_url=pg_url, broker_url=redis_url, **(env | FAST_RETRIES | settings)
        )
        stack.use_sandbox(sandbox.env())
        stack.migrate()
        return stack

    return make
