"""Dead letters: anything refused (an invalid event, a record VBA refused, a held key) with its
reason and its payload, so nothing is dropped without a row saying why."""

from __future__ import annotations

import hashlib
import json
from datetime import datetime
from typing import Any

from sqlmodel import Session

from worker.db import insert
from worker.store.tables import T_DEAD

MAX_DEAD_PAYLOAD = 65_536  # characters of a refused item kept (a valid event is ~1 KB)


def dead_letter(
    session: Session,
    source: str,
    payload: Any,
    reason: str,
    now: datetime,
    *,
    accumulator_id: int | None = None,
    activity_id: str | None = None,
    kind: str | None = None,
) -> None:
    """Record a refused item with its reason; the same item and reason again bumps its count."""
    text = payload if isinstance(payload, str) else json.dumps(payload, sort_keys=True, default=str)
    text, reason = storable(text), storable(reason)
    fingerprint = hashlib.sha256(f"{source}\0{reason}\0{text}".encode()).hexdigest()
    if len(text) > MAX_DEAD_PAYLOAD:  # e.g. a 10 MB event: keep its head, size and hash
        reason += f"; oversized ({len(text)} characters): payload truncated, sha256 kept"
        head = {"truncated": text[:4096], "characters": len(text)}
        text = json.dumps(head | {"sha256": hashlib.sha256(text.encode()).hexdigest()})
    event_id = payload.get("event_id") if isinstance(payload, dict) else None
    # The column is a lookup key: only a clean id goes there (an unstorable one stays, escaped,
    # in the payload).
    if not (
        isinstance(event_id, str) and 0 < len(event_id) <= 128 and storable(event_id) == event_id
    ):
        event_id = None
    row = {
        "source": source,
        "fingerprint": fingerprint,
        "reason": reason,
        "event_id": event_id,
        "accumulator_id": accumulator_id,
        "activity_id": activity_id,
        "kind": kind,
        "payload": text,
        "first_seen": now,
        "last_seen": now,
        "count": 1,
    }
    stmt = insert(session, T_DEAD).values(row)
    session.execute(
        stmt.on_conflict_do_update(
            index_elements=["fingerprint"],
            # The same refusal again (e.g. after a replay) reopens the letter and counts it.
            set_={
                "last_seen": stmt.excluded.last_seen,
                "count": T_DEAD.c["count"] + 1,
                "replayed_at": None,
                "resolution": None,
            },
        )
    )


def storable(text: str) -> str:
    """``text`` as any store takes it: NUL (which Postgres refuses in text) and lone surrogates
    (which no UTF-8 encoder takes) written as their escapes, ``\\u0000`` and ``\\ud800``."""
    if "\x00" in text:
        text = text.replace("\x00", "\\u0000")
    return text.encode("utf-8", "backslashreplace").decode("utf-8")
