"""Every write to a row: VBA's audit stamp, VBA's own additive adjustments, and the journal."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, Final, TypeVar

from models.buckets import VBA_FIELDS
from models.vba import Record, SubscriberAccum
from worker.sandbox.dialect import FROM_VBA, keep_digits

W = TypeVar("W", bound=Record)

#: The user VBA's own adjudication writes rows as (seeded rows, adjustments, intrusions).
VBA_USER: Final = "VBA"
#: Writes the journal keeps: a sandbox serving a long demo must not grow without bound
#: (a row is about 6 kB in memory); older writes are dropped and counted.
JOURNAL_LIMIT: Final = 20_000


def stamp(row: W, previous: Record | None, user: str) -> W:
    """Set entry/update date and user as VBA does on a write: the dates are VBA's; the users
    are the ones the request names (the seeds let a client set them), else the caller's."""
    now = datetime.now(UTC)
    if previous is not None:
        entry_date, entry_user = previous.entry_Date, previous.entry_User
    else:
        entry_date, entry_user = now, row.entry_User or user
    audit = {"entry_Date": entry_date, "entry_User": entry_user, "update_Date": now}
    return row.model_copy(update=audit | {"update_User": row.update_User or user})


def with_deltas(
    current: SubscriberAccum | None,
    key: Mapping[str, Any],
    deltas: Mapping[str, Any],
    exact: bool = False,
) -> SubscriberAccum:
    """``current`` (absent: the row of ``key`` at zero) plus ``deltas``; ValueError if invalid.

    ``exact`` (strict) keeps every digit of the sums; otherwise they must be cents.
    """
    unknown = set(deltas) - set(VBA_FIELDS)
    if unknown:
        raise ValueError(f"unknown amount fields: {sorted(unknown)}")
    base = current.to_wire() if current else dict(key) | dict.fromkeys(VBA_FIELDS, Decimal(0))
    updated = base | {f: Decimal(base[f]) + Decimal(str(d)) for f, d in deltas.items()}
    if not exact:
        return SubscriberAccum.model_validate(updated)
    return keep_digits(SubscriberAccum.model_validate(updated, context=FROM_VBA), updated)


@dataclass
class Write:
    """One write to one row; ``answered`` turns False when the call's answer is lost."""

    seq: int
    at: float
    op: str
    user: str | None
    before: Record | None
    after: Record | None
    status: int
    answered: bool = True

    def to_wire(self) -> dict[str, Any]:
        """The journal entry as ``GET /_admin/journal`` serves it."""
        row = self.after or self.before
        return {
            "seq": self.seq,
            "at": self.at,
            "op": self.op,
            "user": self.user,
            "key": dict(zip(row.KEY, row.key, strict=True)) if row else {},
            "before": self.before.to_wire() if self.before else None,
            "after": self.after.to_wire() if self.after else None,
            "status": self.status,
            "answered": self.answered,
        }


class Journal:
    """Every write to a row, in order, kept in memory only.

    It does not survive a restart (not even with ``--state``): tests read it within one run.
    ``seq`` starts at 1 and keeps growing across resets, so a reader polling with ``since``
    never sees a number twice.
    """

    def __init__(self, limit: int = JOURNAL_LIMIT) -> None:
        self.writes: deque[Write] = deque(maxlen=limit)
        self.seq = 0
        self.dropped = 0

    def record(
        self, op: str, user: str | None, before: Record | None, after: Record | None, status: int
    ) -> Write:
        """Append one write and return it (its ``answered`` may still change)."""
        self.seq += 1
        if len(self.writes) == self.writes.maxlen:
            self.dropped += 1
        write = Write(self.seq, time.time(), op, user, before, after, status)
        self.writes.append(write)
        return write

    def since(self, seq: int) -> list[Write]:
        """The writes after ``seq``, oldest first."""
        return [w for w in self.writes if w.seq > seq]

    def clear(self) -> None:
        """Forget every write (the sequence goes on)."""
        self.writes.clear()
        self.dropped = 0
