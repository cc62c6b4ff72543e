"""The database: one engine per process, sessions, migrations and the retry of lock conflicts."""

from __future__ import annotations

import random
import re
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar, cast

from sqlalchemy import (
    Engine,
    Table,
    create_engine,
    event,
    inspect,
    literal,
    make_url,
    select,
    text,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.pool import NullPool
from sqlalchemy.sql import expression
from sqlmodel import Session
from sqlmodel.sql.sqltypes import UTCDateTime

from worker.logs import Log
from worker.settings import get_settings

if TYPE_CHECKING:
    from alembic.config import Config

log = Log("db")
T = TypeVar("T")

MIGRATIONS = Path(__file__).resolve().parent.parent / "migrations"
RETRYABLE_PGCODES = frozenset({"40001", "40P01", "55P03"})  # serialization, deadlock, lock n/a


def is_postgres(session: Session) -> bool:
    return session.get_bind().dialect.name == "postgresql"


def insert(session: Session, table: Table) -> postgresql.Insert:
    """The dialect's INSERT, which knows ON CONFLICT (SQLite's has the same API as Postgres')."""
    return dialect_insert(table, is_postgres(session))


def dialect_insert(table: Table, postgres: bool) -> postgresql.Insert:
    if postgres:
        return postgresql.insert(table)
    return cast(postgresql.Insert, sqlite.insert(table))


class SchemaMismatch(RuntimeError):
    """The store's schema is not the one this accumsync was written for: nothing may start."""


class NotMigrated(SchemaMismatch):
    """The store's schema is behind this accumsync's (or absent): migrate it first."""


class SchemaTooNew(SchemaMismatch):
    """The store's schema was written by a newer accumsync: this one must not touch it."""


def utcnow() -> datetime:
    """Aware UTC now; every timestamp column is timezone-aware UTC."""
    return datetime.now(UTC)


def as_utc(moment: datetime) -> datetime:
    """``moment`` as aware UTC: SQLite hands timestamps back naive (they are stored as UTC)."""
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def age_seconds(since: datetime | None, now: datetime, places: int = 3) -> float | None:
    """Seconds from ``since`` to ``now`` (never negative, rounded); None when ``since`` is."""
    if since is None:
        return None
    return round(max(0.0, (now - as_utc(since)).total_seconds()), places)


class db_after(expression.FunctionElement[datetime]):
    """The database's own clock plus ``seconds``, as a SQL expression of a timestamp column's
    type: ``db_after(0)`` is its "now". Leases are judged by it, so workers whose clocks
    disagree still agree on who holds a lease."""

    type = UTCDateTime()
    inherit_cache = True

    def __init__(self, seconds: float) -> None:
        super().__init__(literal(float(seconds)))


@compiles(db_after, "postgresql")
def _pg_after(element: db_after, compiler: Any, **kw: Any) -> str:
    seconds = compiler.process(next(iter(element.clauses)), **kw)
    return f"(now() + make_interval(secs => {seconds}))"


@compiles(db_after, "sqlite")
def _sqlite_after(element: db_after, compiler: Any, **kw: Any) -> str:
    # SQLAlchemy stores SQLite timestamps as 'YYYY-MM-DD HH:MM:SS.ffffff' (UTC): the same text
    # shape, so comparisons between stored and computed times stay lexical and exact.
    seconds = compiler.process(next(iter(element.clauses)), **kw)
    return f"(strftime('%Y-%m-%d %H:%M:%f', 'now', {seconds} || ' seconds') || '000')"


def db_now() -> db_after:
    """The database's clock, as a SQL expression."""
    return db_after(0)


def clock(session: Session) -> datetime:
    """The database's clock, read once (for comparisons against times it wrote)."""
    now: datetime = session.execute(select(db_now())).scalar_one()
    return as_utc(now)


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    dbapi_conn.isolation_level = None  # let BEGIN IMMEDIATE below own the transaction
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.close()


def _sqlite_begin(conn: Any) -> None:
    # A writer takes the write lock up front: no deadlock-prone read-to-write lock upgrades.
    conn.exec_driver_sql("BEGIN IMMEDIATE")


def make_engine(url: str) -> Engine:
    """An engine for ``url``; SQLite gets WAL, a busy timeout and immediate transactions."""
    if url.startswith("sqlite"):
        _make_folder(url)
        engine = create_engine(
            url, poolclass=NullPool, connect_args={"timeout": 30}, hide_parameters=True
        )
        event.listen(engine, "connect", _sqlite_pragmas)
        event.listen(engine, "begin", _sqlite_begin)
        return engine
    # hide_parameters: an error message must never carry member data into logs or Flower.
    settings = get_settings()
    return create_engine(
        url,
        pool_pre_ping=True,
        pool_size=5,
        max_overflow=5,
        hide_parameters=True,
        connect_args=link_options(settings.db_connect_timeout, settings.db_link_timeout),
    )


def _make_folder(url: str) -> None:
    """The SQLite file's folder (``ACCUMSYNC_HOME`` by default), made when first used."""
    database = make_url(url).database
    if database and database != ":memory:":
        Path(database).expanduser().parent.mkdir(parents=True, exist_ok=True)


def link_options(connect_timeout: int, link_timeout: int) -> dict[str, int | str]:
    """libpq options that give up a connection whose network went silent for ``link_timeout`` s.

    A partition (a lost NAT entry, a failover) drops packets with no FIN and no RST, and libpq has
    no read timeout: a session waiting for a reply, or the pool's pre-ping on a connection idle
    across the partition, waited forever (or ~15 minutes of retransmits), its worker holding the
    message. Keepalives end an idle link after ``idle + 3 * interval`` s of unanswered probes;
    TCP_USER_TIMEOUT ends one whose sent data stays unacknowledged as long. A slow query is not
    cut: the server's kernel answers the probes while it works. ``connect_timeout``: a host that
    drops packets is said within seconds, not after minutes.

    The server's side of a lost connection may live on (its own keepalives wait hours), holding
    the row locks of the transaction it was in, and every worker's next ingest of those rows
    waited behind it for good: the server ends a transaction idle that long. No transaction of
    ours idles (none spans a VBA call), so only an orphan is cut."""
    idle = max(1, link_timeout // 2)
    return {
        "options": f"-c idle_in_transaction_session_timeout={link_timeout * 1000}",
        "connect_timeout": connect_timeout,
        "keepalives": 1,
        "keepalives_idle": idle,
        "keepalives_interval": max(1, (link_timeout - idle) // 3),
        "keepalives_count": 3,
        "tcp_user_timeout": link_timeout * 1000,
    }


@cache
def engine() -> Engine:
    """The process's engine for the configured store."""
    return make_engine(get_settings().effective_database_url)


def reset_engine() -> None:
    """Forget the engine (tests switching databases; after fork, so pools aren't shared)."""
    if engine.cache_info().currsize:
        engine().dispose(close=False)
    engine.cache_clear()


@contextmanager
def session_scope() -> Iterator[Session]:
    """A session that commits on success and rolls back on error."""
    with Session(engine(), expire_on_commit=False) as session:
        try:
            yield session
            session.commit()
        except BaseException:
            session.rollback()
            raise


def is_retryable(exc: BaseException) -> bool:
    """A lock conflict worth retrying: deadlock, serialization failure, SQLite busy."""
    if not isinstance(exc, DBAPIError):
        return False
    code = getattr(exc.orig, "sqlstate", None) or getattr(exc.orig, "pgcode", None)
    if code in RETRYABLE_PGCODES:
        return True
    return isinstance(exc, OperationalError) and "database is locked" in str(exc.orig)


def in_transaction(work: Callable[[Session], T], attempts: int = 8) -> T:
    """Run ``work`` in one transaction, retrying deadlocks and serialization failures."""
    for attempt in range(1, attempts + 1):
        try:
            with session_scope() as session:
                return work(session)
        except DBAPIError as exc:
            if attempt == attempts or not is_retryable(exc):
                raise
            log.warning("db.retry", attempt=attempt, error=type(exc.orig).__name__)
            time.sleep(random.uniform(0, 0.05 * 2**attempt))
    raise AssertionError("unreachable")


def alembic_config(url: str | None = None) -> Config:
    """Alembic configured for the packaged migrations and the given (or configured) store."""
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.set_main_option("sqlalchemy.url", url or get_settings().effective_database_url)
    return cfg


def upgrade(url: str | None = None) -> None:
    """Migrate the store to the latest schema (``accumsync db upgrade``); a store migrated by a
    newer accumsync is refused with :class:`SchemaTooNew` (alembic would only say it can't
    locate the revision)."""
    from alembic import command

    eng = make_engine(url or get_settings().effective_database_url)
    try:
        if isinstance(problem := _mismatch(eng), SchemaTooNew):
            raise problem
    finally:
        eng.dispose()
    command.upgrade(alembic_config(url), "head")


REVISION = re.compile(r'^revision: str = "([^"]+)"$', re.MULTILINE)


@cache
def known_revisions() -> tuple[str, ...]:
    """Every revision this accumsync's migrations define, oldest first: each file's
    ``revision`` line, in file name order (``0001_ledger.py``...). The schema guard runs in
    every command and worker start, and alembic's own walk of the same files costs 0.4 s of
    imports each time; tests/unit/test_schema_guard.py holds the two to the same list."""
    files = sorted((MIGRATIONS / "versions").glob("[0-9]*.py"))
    return tuple(m.group(1) for f in files if (m := REVISION.search(f.read_text())))


def schema_mismatch(store: Sequence[str], known: Sequence[str]) -> SchemaMismatch | None:
    """What is wrong with a store at revision(s) ``store`` for code whose migrations are
    ``known`` (oldest first, the last is its head); None when they agree.

    A revision the code does not know was written by a newer accumsync (a migration applied
    before this process was upgraded): it must not run, as its statements may no longer match
    the tables. A store behind the code's head must be migrated before the code runs on it."""
    head = known[-1]
    newer = [r for r in store if r not in known]
    if newer:
        return SchemaTooNew(
            f"this accumsync knows schema up to {head}; the store is at {', '.join(newer)}, "
            "written by a newer accumsync: upgrade this worker to the release that migrated it"
        )
    if list(store) != [head]:
        return NotMigrated(
            f"database schema is at {', '.join(store) or 'nothing'}, expected {head}: "
            "run `accumsync db upgrade` (same ACCUMSYNC_DATABASE_URL) before starting workers"
        )
    return None


def check_migrated(eng: Engine | None = None) -> None:
    """Raise :class:`NotMigrated` or :class:`SchemaTooNew`, naming what to do, unless the store's
    schema is the one this code's head describes. One connection: the version table's rows."""
    if problem := _mismatch(eng or engine()):
        raise problem


def _mismatch(eng: Engine) -> SchemaMismatch | None:
    with eng.connect() as conn:
        store = store_revisions(conn)
    return schema_mismatch(store, known_revisions())


def store_revisions(conn: Any) -> list[str]:
    """The revisions alembic recorded in the store (its ``alembic_version`` rows); none in a
    store never migrated."""
    if not inspect(conn).has_table("alembic_version"):
        return []
    return sorted(conn.execute(text("SELECT version_num FROM alembic_version")).scalars())
