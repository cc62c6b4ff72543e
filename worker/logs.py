"""Structured log lines: ``log.info("flush.sent", pair=7, items=3)``, as text or JSON.

Fields are opaque ids, counts, statuses and VBA activityIds. Never pass member data (subscriber or
group ids, amounts) or secrets: these lines end up in log aggregators that many people read.

A log call writes a line and nothing else (durable counts have their own hook:
worker/store/counters.py).
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import Any

_CONFIGURED = False


class _Formatter(logging.Formatter):
    def __init__(self, fmt: str) -> None:
        super().__init__()
        self.json = fmt == "json"

    def format(self, record: logging.LogRecord) -> str:
        fields: dict[str, Any] = getattr(record, "fields", {})
        ts = datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds")
        if self.json:
            line = {"ts": ts, "level": record.levelname.lower(), "logger": record.name}
            line["event"] = record.getMessage()
            line.update(fields)
            if record.exc_info:
                line["exc"] = self.formatException(record.exc_info)
            return json.dumps(line, default=str)
        kv = " ".join(f"{k}={v}" for k, v in fields.items())
        text = f"{ts} {record.levelname:<7} {record.name} {record.getMessage()} {kv}".rstrip()
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        return text


#: Libraries whose INFO lines carry URLs with subscriber and group ids: WARNING and up only.
QUIET = ("httpx", "httpcore", "urllib3")


def reformat(logger: logging.Logger, fmt: str) -> None:
    """In JSON mode, give ``logger``'s handlers our formatter: Celery's own lines as JSON too."""
    if fmt == "json":
        for handler in logger.handlers:
            handler.setFormatter(_Formatter(fmt))


def configure(fmt: str = "text", level: str = "INFO") -> None:
    """Install the accumsync formatter on the ``accumsync`` logger tree (idempotent)."""
    global _CONFIGURED
    for name in QUIET:
        logging.getLogger(name).setLevel(logging.WARNING)
    root = logging.getLogger("accumsync")
    root.setLevel(level.upper())
    if _CONFIGURED:
        for h in root.handlers:
            h.setFormatter(_Formatter(fmt))
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Formatter(fmt))
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
