"""Structured log lines: ``log.info("flush.sent", pair=7, items=3)``, as text or JSON.

Fields are opaque ids, counts, statuses and VBA activityIds. Never pass member data (subscriber or
group ids, amounts) or secrets: these lines end up in log aggregators that many people read.

A log call writes a line and nothing else (durable counts have their own hook:
worker/store/counters.py). Lines are stdlib records rendered by structlog's
``ProcessorFormatter``, ours and (with ``ACCUMSYNC_LOG_FORMAT=json``) Celery's alike; inside a
Celery task every line carries the task's id and name (bound at ``task_prerun``), so a task in
Flower joins its ``flush.sent`` line. Text: ``ts LEVEL logger event k=v ...``; JSON: one object.
"""

from __future__ import annotations

import logging
import sys
from datetime import UTC, datetime
from typing import Any

from structlog.contextvars import bind_contextvars, clear_contextvars, merge_contextvars
from structlog.processors import JSONRenderer, format_exc_info
from structlog.stdlib import ProcessorFormatter
from structlog.typing import EventDict, WrappedLogger

_CONFIGURED = False


def _our_fields(_: WrappedLogger, __: str, line: EventDict) -> EventDict:
    """The line's head (time of the record, level, logger) and a ``Log`` call's fields, in the
    order they were given; the bound context (the task) follows."""
    record: logging.LogRecord = line["_record"]
    head = {
        "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
        "level": record.levelname,
        "logger": record.name,
        "event": line.pop("event"),
    }
    fields: dict[str, Any] = getattr(record, "fields", {})
    return {**head, **fields, **line}


def _text(_: WrappedLogger, __: str, line: EventDict) -> str:
    """``ts LEVEL logger event k=v ...``, the traceback (if any) on the lines below."""
    exc = line.pop("exception", None)
    ts, level, logger, event = (line.pop(k) for k in ("ts", "level", "logger", "event"))
    kv = " ".join(f"{k}={v}" for k, v in line.items())
    text = f"{ts} {level:<7} {logger} {event} {kv}".rstrip()
    return f"{text}\n{exc}" if exc else text


def _json_names(_: WrappedLogger, __: str, line: EventDict) -> EventDict:
    """JSON lines name the level in lower case and the traceback ``exc``."""
    line["level"] = line["level"].lower()
    if "exception" in line:
        line["exc"] = line.pop("exception")
    return line


def formatter(fmt: str) -> ProcessorFormatter:
    """structlog's formatter for stdlib records, ours and Celery's alike: the record's fields,
    the context bound to this task (:func:`bind_task`), then text or JSON."""
    render = [_json_names, JSONRenderer(default=str)] if fmt == "json" else [_text]
    return ProcessorFormatter(
        foreign_pre_chain=[merge_contextvars, _our_fields, format_exc_info],
        processors=[ProcessorFormatter.remove_processors_meta, *render],
    )


def bind_task(task_id: str, task: str) -> None:
    """Every line until :func:`unbind_task` carries the Celery task's id and name: the id Flower
    shows for the task (never an argument: those may be member data)."""
    clear_contextvars()
    bind_contextvars(task=task, task_id=task_id)


def unbind_task() -> None:
    clear_contextvars()


#: Libraries whose INFO lines carry URLs with subscriber and group ids: WARNING and up only.
QUIET = ("httpx", "httpcore", "urllib3")


def reformat(logger: logging.Logger, fmt: str) -> None:
    """In JSON mode, give ``logger``'s handlers our formatter: Celery's own lines as JSON too."""
    if fmt == "json":
        for handler in logger.handlers:
            handler.setFormatter(formatter(fmt))


def configure(fmt: str = "text", level: str = "INFO") -> None:
    """Install the accumsync formatter on the ``accumsync`` logger tree (idempotent)."""
    global _CONFIGURED
    for name in QUIET:
        logging.getLogger(name).setLevel(logging.WARNING)
    root = logging.getLogger("accumsync")
    root.setLevel(level.upper())
    if _CONFIGURED:
        for h in root.handlers:
            h.setFormatter(formatter(fmt))
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter(fmt))
    root.addHandler(handler)
    root.propagate = False
    _CONFIGURED = True


class Log:
    """A named logger taking an event name and keyword fields."""

    def __init__(self, name: str) -> None:
        self._log = logging.getLogger(f"accumsync.{name}")

    def _emit(self, level: int, event: str, exc: bool, fields: dict[str, Any]) -> None:
        if self._log.isEnabledFor(level):
            self._log.log(level, event, extra={"fields": fields}, exc_info=exc)

    def debug(self, event: str, **fields: Any) -> None:
        self._emit(logging.DEBUG, event, False, fields)

    def info(self, event: str, **fields: Any) -> None:
        self._emit(logging.INFO, event, False, fields)

    def warning(self, event: str, **fields: Any) -> None:
        self._emit(logging.WARNING, event, False, fields)

    def error(self, event: str, exc: bool = False, **fields: Any) -> None:
        self._emit(logging.ERROR, event, exc, fields)
