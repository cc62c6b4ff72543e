"""What went wrong, in one or two lines an operator can act on: the setting, the host:port, the fix.

The command line (and ``health``) turn the errors a misconfigured or unreachable system raises
into these lines instead of a traceback. Nothing here prints a password: URLs are rendered with
it masked, and a driver's message is stripped of it before it is quoted.
"""

from __future__ import annotations

from typing import Any, Final
from urllib.parse import urlsplit

from pydantic import ValidationError

DRIVER_LINE_MAX: Final = 160

_STORE_MISSING_TABLE: Final = ("no such table", "UndefinedTable", "does not exist")


def problem_of(exc: BaseException) -> str | None:
    """The problem ``exc`` shows, as a line or two naming what to fix; None when it is not one
    of the configuration or reachability problems an operator fixes outside accumsync."""
    from worker.db import SchemaMismatch
    from worker.settings import NotConfigured

    if interrupted(exc):
        return None
    if isinstance(exc, ValidationError) and exc.title == "Settings":
        return _setting(exc)
    if isinstance(exc, NotConfigured):
        return f"{exc}\nset it in the environment (or .env) and run the command again"
    if isinstance(exc, SchemaMismatch):
        return str(exc)
    if _is_sqlalchemy(exc):
        return _store(exc)
    if _is_broker(exc):
        return _broker(exc)
    return None


def interrupted(exc: BaseException) -> bool:
    """``exc`` is Ctrl-C (or a SIGTERM turned into it), or an error raised while one was being
    handled. A signal that lands in the middle of a driver's round trip (SQLAlchemy's pre-ping
    of a pooled connection, say) leaves the connection busy, and the driver's cleanup raises its
    own error ("can't change 'autocommit' now") over the interruption: that is not a store
    problem, and saying "cannot reach the store" would send an operator to the wrong place."""
    return _in_chain(exc, KeyboardInterrupt)


def _in_chain(exc: BaseException, kind: type[BaseException]) -> bool:
    """``exc`` or an exception it was raised from or while handling is a ``kind``."""
    seen: set[int] = set()
    link: BaseException | None = exc
    while link is not None and id(link) not in seen:
        if isinstance(link, kind):
            return True
        seen.add(id(link))
        link = link.__cause__ or link.__context__
    return False


def _setting(exc: ValidationError) -> str:
    lines = []
    for e in exc.errors(include_url=False, include_input=False):
        name = "ACCUMSYNC_" + "_".join(str(p) for p in e["loc"]).upper() if e["loc"] else ""
        message = str(e["msg"]).removeprefix("Value error, ")
        lines.append(f"invalid setting {name}: {message}".replace(" :", ":"))
    lines.append("fix it in the environment (or .env) and run the command again")
    return "\n".join(lines)


def _is_sqlalchemy(exc: BaseException) -> bool:
    from sqlalchemy.exc import DBAPIError

    return isinstance(exc, DBAPIError) and not _is_broker_table(exc)


def _is_broker_table(exc: BaseException) -> bool:
    # The embedded broker is kombu's SQLAlchemy transport: its tables are kombu_*.
    return "kombu_" in str(getattr(exc, "statement", "") or "")


def _store(exc: BaseException) -> str:
    from sqlalchemy.engine import make_url

    from worker.settings import get_settings

    raw = get_settings().effective_database_url
    url = make_url(raw)
    shown = url.render_as_string(hide_password=True)
    detail = _driver_line(getattr(exc, "orig", exc), url.password)
    if any(mark in detail for mark in _STORE_MISSING_TABLE):
        return (
            f"the store at {shown} has no accumsync schema ({detail}): "
            "run `accumsync db upgrade` (same ACCUMSYNC_DATABASE_URL)"
        )
    sqlite = url.drivername.startswith("sqlite")
    where = url.database if sqlite else f"{url.host}:{url.port or 5432}"
    return (
        f"cannot reach the store at {where} ({shown}): {detail}\n"
        "is it running, and is ACCUMSYNC_DATABASE_URL right?"
    )


def _is_broker(exc: BaseException) -> bool:
    from kombu.exceptions import OperationalError as KombuOperationalError
    from redis.exceptions import ConnectionError as RedisConnectionError
    from redis.exceptions import TimeoutError as RedisTimeoutError

    broken = (KombuOperationalError, RedisConnectionError, RedisTimeoutError, ConnectionError)
    return isinstance(exc, broken) or _is_broker_table(exc)


def _broker(exc: BaseException) -> str:
    from worker.settings import get_settings

    settings = get_settings()
    raw, name = settings.effective_broker_url, "ACCUMSYNC_BROKER_URL"
    if _is_redis_error(exc) and settings.redis_url and not raw.startswith("redis"):
        raw, name = settings.redis_url, "ACCUMSYNC_REDIS_URL"
    parts = urlsplit(raw)
    shown = mask(raw)
    where = f"{parts.hostname}:{parts.port}" if parts.hostname else shown
    if _nacked(exc):
        return (
            f"the broker at {where} ({shown}) refused a message (it nacked the publish: a queue "
            "at its max-length with overflow reject-publish, or another broker-side limit)\n"
            "the events before it were published, the rest were not: publish them all again "
            "once the broker takes messages (a duplicate event changes nothing)"
        )
    detail = _driver_line(exc, parts.password)
    return (
        f"cannot reach the broker at {where} ({shown}): {detail}\n"
        f"is it running, and is {name} right?"
    )


def _nacked(exc: BaseException) -> bool:
    """RabbitMQ refused a publish (publisher confirms: kombu raises its OperationalError from
    py-amqp's MessageNacked)."""
    from amqp.exceptions import MessageNacked

    return _in_chain(exc, MessageNacked)


def _is_redis_error(exc: BaseException) -> bool:
    from redis.exceptions import RedisError

    return isinstance(exc, RedisError) or isinstance(exc.__cause__, RedisError)


def mask(url: str) -> str:
    """``url`` with its password replaced by ``***``."""
    parts = urlsplit(url)
    if not parts.password:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return parts._replace(netloc=netloc).geturl()


def _driver_line(exc: Any, password: str | None) -> str:
    """The driver's own words (its first line), without the password, kept short."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    text = lines[0] if lines else type(exc).__name__
    if password:
        text = text.replace(password, "***")
    return text[:DRIVER_LINE_MAX]
