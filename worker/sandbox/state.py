"""The sandbox's state: accumulator rows and issued tokens, in memory and optionally in SQLite."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal, TypeVar, cast

from models.vba import PlanAccumulator, Record, SubscriberAccum, loads
from worker.sandbox.dialect import FROM_VBA, Fold, Key, dumps, exact, keep_digits

Kind = Literal["subscriber", "plan"]
W = TypeVar("W", bound=Record)
__all__ = ["Key", "State"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS rows (kind TEXT, key TEXT, body TEXT, PRIMARY KEY (kind, key));
CREATE TABLE IF NOT EXISTS tokens (token TEXT PRIMARY KEY, kind TEXT, expires_at REAL, owner TEXT);
"""


class State:
    """Rows by key and tokens by value; every change is mirrored to the SQLite file if any.

    The rows are filed under ``fold(key)``: the key as it compares (exactly in lax; as SQL
    Server's collation in strict), while each row keeps the spelling it was created with.
    """

    def __init__(self, path: Path | None = None, fold: Fold = exact) -> None:
        self.fold = fold
        self.subscriber: dict[Key, SubscriberAccum] = {}
        self.plans: dict[Key, PlanAccumulator] = {}
        self.id_tokens: dict[str, float] = {}  # id token -> expires at (epoch seconds)
        self.refresh_tokens: dict[str, str] = {}  # refresh token -> the id token it renews
        self.db = sqlite3.connect(path, check_same_thread=False) if path else None
        if self.db is not None:
            self.db.executescript(_SCHEMA)
            self._load(self.db)

    def _load(self, db: sqlite3.Connection) -> None:
        for kind, body in db.execute("SELECT kind, body FROM rows"):
            model = SubscriberAccum if kind == "subscriber" else PlanAccumulator
            payload = loads(body)
            row = keep_digits(model.model_validate(payload, context=FROM_VBA), payload)
            self.table(model)[self.fold(row.key)] = row
        for token, kind, expires_at, owner in db.execute("SELECT * FROM tokens"):
            if kind == "id":
                self.id_tokens[token] = expires_at
            else:
                self.refresh_tokens[token] = owner

    def _write(self, sql: str, *args: object) -> None:
        if self.db is not None:
            with self.db:
                self.db.execute(sql, args)

    def table(self, model: type[Record]) -> dict[Key, Record]:
        """The rows of one model, by folded key."""
        rows: dict[Key, Any] = self.subscriber if model is SubscriberAccum else self.plans
        return rows

    def get(self, model: type[W], key: Key) -> W | None:
        """The row of ``model`` whose key compares equal to ``key``, if any."""
        return cast(W | None, self.table(model).get(self.fold(key)))

    def put(self, row: Record) -> None:
        """Insert or replace a row."""
        key = self.fold(row.key)
        if isinstance(row, SubscriberAccum):
            kind: Kind = "subscriber"
            self.subscriber[key] = row
        elif isinstance(row, PlanAccumulator):
            kind = "plan"
            self.plans[key] = row
        else:
            raise TypeError(f"not a VBA row: {type(row).__name__}")
        sql = "INSERT OR REPLACE INTO rows VALUES (?, ?, ?)"
        self._write(sql, kind, json.dumps(key), dumps(row.to_wire()))

    def delete(self, key: Key) -> bool:
        """Remove the subscriber row ``key`` compares equal to; False when there was none."""
        key = self.fold(key)
        if self.subscriber.pop(key, None) is None:
            return False
        self._write("DELETE FROM rows WHERE kind = 'subscriber' AND key = ?", json.dumps(key))
        return True

    def issue(self, id_token: str, expires_at: float, refresh_token: str | None) -> None:
        """Remember an id token (and the refresh token that may renew it)."""
        self.id_tokens[id_token] = expires_at
        self._write("INSERT OR REPLACE INTO tokens VALUES (?, 'id', ?, '')", id_token, expires_at)
        if refresh_token:
            self.refresh_tokens[refresh_token] = id_token
            sql = "INSERT OR REPLACE INTO tokens VALUES (?, 'refresh', 0, ?)"
            self._write(sql, refresh_token, id_token)

    def expire_tokens(self, now: float) -> None:
        """Every id token issued so far expires now (refresh tokens stay valid)."""
        self.id_tokens = {t: min(exp, now) for t, exp in self.id_tokens.items()}
        self._write("UPDATE tokens SET expires_at = min(expires_at, ?) WHERE kind = 'id'", now)

    def reset(self) -> None:
        """Forget every row and token."""
        self.subscriber.clear()
        self.plans.clear()
        self.id_tokens.clear()
        self.refresh_tokens.clear()
        self._write("DELETE FROM rows")
        self._write("DELETE FROM tokens")

    def rows(self) -> Iterator[Record]:
        """Every row, subscriber accumulators first, in (folded) key order."""
        yield from (self.subscriber[k] for k in sorted(self.subscriber))
        yield from (self.plans[k] for k in sorted(self.plans))
