"""What both Redis fetches (worker/redisbroker.py, worker/redisstock.py) do alike when Redis is
full (``maxmemory``, ``noeviction``)."""

from __future__ import annotations

from typing import Any

from redis.exceptions import OutOfMemoryError

from worker.logs import Log

log = Log("broker")


class SkipRestoreWhenFull:
    """A QoS mixin: a restore pass Redis refuses for memory is skipped, not raised (every
    second while full; the next pass restores)."""

    def restore_visible(self, *args: Any, **kwargs: Any) -> None:
        try:
            super().restore_visible(*args, **kwargs)  # type: ignore[misc]
        except OutOfMemoryError:
            log.debug("broker.full.restore_skipped")
