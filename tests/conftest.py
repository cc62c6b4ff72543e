"""Fixtures shared by every suite: real Redis and PostgreSQL, fresh databases, running stacks."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

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
from worker.db import upgrade

# No hypothesis deadline: its 200 ms default is a timed assertion, and it fails pure-logic tests
# at random on a loaded 2-core machine (two test lanes, worker processes) without finding a bug.
settings.register_profile("accumsync", deadline=None)
settings.load_profile("accumsync")

#: Modules whose tests share a module fixture worth running once: every command's run
#: (test_cli_errors), one stack with its sandbox (test_flush_edges).
ONE_LANE = ("tests/integration/test_cli_errors.py", "tests/integration/test_flush_edges.py")
#: Chaos modules that touch no shared service and time no recovery: the faults are their own
#: workers' (failpoints) and their own servers' (TLS), so they need no lane to themselves.
SHARING = ("tests/chaos/test_redis_kill.py", "tests/chaos/test_security.py")


def lane_of(nodeid: str) -> str:
    """The xdist work unit a test belongs to (``make test`` runs four lanes):

    - ``rabbitmq``: every test on RabbitMQ (their ids say amqp) and the chaos scenario that closes
      every RabbitMQ connection and stops its app, one at a time on one lane;
    - ``chaos``: every other chaos scenario but those of :data:`SHARING` (they kill, stop, restart
      and fill servers, and time recoveries), one at a time on one lane;
    - one lane per module of :data:`ONE_LANE` (each shares an expensive module fixture);
    - any other test on its own, wherever a lane is free.

    pytest-xdist's own ``xdist_group`` marks do nothing under pytest 9 (xdist 3.8 renames
    ``item._nodeid``, which pytest 9 no longer reads: groups were silently spread over the lanes),
    so the lanes are given to xdist's scheduler directly, below.
    """
    module = nodeid.split("::", 1)[0]
    if "amqp" in nodeid or module == "tests/chaos/test_rabbitmq.py":
        return "rabbitmq"
    if module.startswith("tests/chaos/") and module not in SHARING:
        return "chaos"
    return module if module in ONE_LANE else nodeid


def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """``--dist loadgroup`` with the lanes of :func:`lane_of`."""
    if config.getvalue("dist") != "loadgroup":
        return None
    from xdist.scheduler import LoadGroupScheduling

    class Lanes(LoadGroupScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return lane_of(nodeid)

    return Lanes(config, log)


#: Seconds of tests (setup, call, teardown) each xdist worker ran, by lane: the long pole of
#: ``make test`` is the busiest worker, printed at the end of the run.
WORKER_LANES: defaultdict[str, defaultdict[str, float]] = defaultdict(lambda: defaultdict(float))


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    worker = getattr(getattr(report, "node", None), "gateway", None)
    if worker is not None:  # on xdist's controller, a worker's report
        WORKER_LANES[worker.id][lane_kind(report.nodeid)] += report.duration


def lane_kind(nodeid: str) -> str:
    """A lane, or "other" for a test that is a lane of its own."""
    lane = lane_of(nodeid)
    return "other" if lane == nodeid else lane


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not WORKER_LANES:
        return
    terminalreporter.section("seconds of tests per xdist worker, busiest lanes first")
    for worker, lanes in sorted(WORKER_LANES.items()):
        parts = sorted(lanes.items(), key=lambda kv: -kv[1])
        shown = ", ".join(f"{lane} {seconds:.0f}" for lane, seconds in parts[:4])
        terminalreporter.write_line(f"{worker}: {sum(lanes.values()):.0f} s ({shown})")


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


@pytest.fixture(params=["sqlite", "postgres"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh store of each kind, migrated: a SQLite file, or a Postgres database of its own
    (``pg_url``: dropped afterwards)."""
    sqlite = request.param == "sqlite"
    url = f"sqlite:///{tmp_path / 'store.db'}" if sqlite else request.getfixturevalue("pg_url")
    upgrade(url)
    return url


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
