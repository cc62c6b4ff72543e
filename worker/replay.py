"""``accumsync dead-letters replay``: give refused events and items another chance after a fix.

An ingest dead letter is re-published as it arrived (the worker validates it again: still bad,
it comes back as the same letter, reopened and counted). A flush dead letter releases its
accumulator: attempts reset, no longer held, so the next flush sends it.
"""

from __future__ import annotations

import json
from typing import Any

from sqlalchemy import select, update
from sqlmodel import Session, col

from models.tables import Accumulator, DeadLetter
from worker.db import utcnow

T_ACCUM = Accumulator.__table__  # type: ignore[attr-defined]


def replay(
    session: Session, ids: list[int] | None = None, source: str | None = None
) -> tuple[list[Any], int]:
    """Close the chosen open letters; returns (ingest payloads to re-publish, items released)."""
    query = select(DeadLetter).where(col(DeadLetter.replayed_at).is_(None))
    if ids:
        query = query.where(col(DeadLetter.id).in_(ids))
    if source:
        query = query.where(col(DeadLetter.source) == source)
    events: list[Any] = []
    released = 0
    now = utcnow()
    for letter in session.execute(query.order_by(col(DeadLetter.id))).scalars():
        if letter.source == "ingest":
            events.append(_payload(letter.payload))
        elif letter.accumulator_id is not None:
            values = {"held": False, "attempts": 0, "next_attempt_at": None}
            session.execute(
                update(T_ACCUM).where(T_ACCUM.c.id == letter.accumulator_id).values(**values)
            )
            released += 1
        letter.replayed_at = now
        session.add(letter)
    # Write now: the row locks make a worker re-refusing a replayed event wait for our commit,
    # so its reopening of the letter lands after (not under) our "replayed".
    session.flush()
    return events, released


def _payload(text: str) -> Any:
    """The event as it arrived: JSON back to an object, unparsable text as the text itself."""
    try:
        return json.loads(text)
    except ValueError:
        return text
