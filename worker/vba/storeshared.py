"""The rate-limit bucket and the VBA token held by the store, for a fleet without Redis.

On the embedded defaults (SQLite store, SQLite broker) a worker started with ``-c 2`` runs two
processes; with in-process buckets and tokens each would spend VBA's whole budget and log in on
its own (a run from outside saw 7 429s and 2 logins). Here every process reads and writes one
row of ``shared_state`` per bucket or token, in a short transaction, by the store's clock: the
same rules as the Redis versions (``worker.vba.ratelimit.RedisBucket``,
``worker.vba.auth.RedisTokenStore``), one round trip to the store per VBA call. SQLite serializes
the writers (its write lock is taken at BEGIN); Postgres locks the row (``FOR UPDATE``).
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from typing import Any

from sqlalchemy import delete, or_, select, update
from sqlmodel import Session

from worker.db import clock, db_after, db_now, in_transaction, insert
from worker.store.tables import T_SHARED
from worker.vba.auth import LOCK_TTL_MS, Token


def _load(session: Session, name: str, lock: bool = False) -> dict[str, Any] | None:
    query = select(T_SHARED.c.value).where(T_SHARED.c.name == name)
    raw = session.execute(query.with_for_update() if lock else query).scalar()
    return json.loads(raw) if raw else None


def _save(session: Session, name: str, value: dict[str, Any]) -> None:
    stmt = insert(session, T_SHARED).values(name=name, value=json.dumps(value))
    session.execute(
        stmt.on_conflict_do_update(index_elements=["name"], set_={"value": stmt.excluded.value})
    )


class StoreBucket:
    """VBA's token bucket in the store: burst tokens at once, then ``rate`` a second, for every
    process of the fleet together (a reservation may go negative: its caller sleeps until due)."""

    def __init__(self, name: str, rate: float, burst: int) -> None:
        self.name, self.rate, self.burst = name, rate, float(burst)

    def reserve(self) -> float:
        """Take a token now; the seconds until it is due (0 when one was in the bucket)."""
        return in_transaction(self._reserve)

    def _reserve(self, session: Session) -> float:
        now = clock(session).timestamp()
        state = _load(session, self.name, lock=True) or {}
        tokens = float(state.get("tokens", self.burst))
        elapsed = max(0.0, now - float(state.get("ts", now)))
        tokens = min(self.burst, tokens + elapsed * self.rate) - 1
        _save(session, self.name, {"tokens": tokens, "ts": now})
        return max(0.0, -tokens / self.rate)

    def acquire(self) -> float:
        """Block until a token is ours; return the seconds waited."""
        wait = self.reserve()
        if wait > 0:
            time.sleep(wait)
        return wait


class StoreTokenStore:
    """The id token in the store, one per VBA account; a row with an end time guards renewal,
    held by one process at a time (for at most its TTL) and released only by its holder."""

    def __init__(self, prefix: str) -> None:
        self.key, self.lock_key = f"{prefix}:token", f"{prefix}:token-lock"

    def load(self) -> Token | None:
        value = in_transaction(lambda s: _load(s, self.key))
        return Token(**value) if value else None

    def save(self, token: Token) -> None:
        in_transaction(lambda s: _save(s, self.key, asdict(token)))

    @contextmanager
    def try_lock(self) -> Iterator[bool]:
        owner = secrets.token_hex(8)
        held = in_transaction(lambda s: self._take(s, owner))
        try:
            yield held
        finally:
            if held:
                in_transaction(lambda s: self._release(s, owner))

    def _take(self, session: Session, owner: str) -> bool:
        """The lock row, if it is free or its holder's time ran out."""
        c = T_SHARED.c
        until = db_after(LOCK_TTL_MS / 1000)
        value = json.dumps({"owner": owner})
        taken = update(T_SHARED).where(c.name == self.lock_key)
        taken = taken.where(or_(c.until.is_(None), c.until < db_now()))
        if session.execute(taken.values(value=value, until=until)).rowcount:  # type: ignore[attr-defined]
            return True
        stmt = insert(session, T_SHARED).values(name=self.lock_key, value=value, until=until)
        # RETURNING, not rowcount: psycopg reports -1 for an INSERT .. ON CONFLICT DO NOTHING
        # (taken for "inserted", two processes each held the lock on a Postgres store).
        added = stmt.on_conflict_do_nothing(index_elements=["name"]).returning(c.name)
        return session.execute(added).first() is not None

    def _release(self, session: Session, owner: str) -> None:
        c = T_SHARED.c
        mine = c.value == json.dumps({"owner": owner})
        session.execute(delete(T_SHARED).where(c.name == self.lock_key, mine))
