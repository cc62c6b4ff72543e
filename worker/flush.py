"""The flush protocol (DESIGN.md section 4) for one (subscriber, group) pair.

1. Take the pair's lease (two workers can't both hold it; it expires if its holder dies).
2. Read VBA's rows for the pair when needed (shared ownership, or an intent of unknown outcome)
   and resolve unknown intents: VBA's row equal to the recorded target means it landed.
3. Compute absolute targets (``models.sync.target``), check total == in + out, record the intent.
4. ``PUT .../accumulators-batch`` in chunks of ``vba_batch_max``; read each 207 item by key:
   2xx confirms our share, 5xx retries later (``next_attempt_at``), 4xx becomes a dead letter.
   A whole-call outage (429, 5xx, timeout) backs the pair off and keeps the intents for step 2.
"""

from __future__ import annotations

import json
import os
import random
import socket
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from functools import cache
from typing import Any, cast

from pydantic import ValidationError
from redis.exceptions import RedisError
from sqlalchemy import CursorResult, and_, func, or_, select, update
from sqlmodel import Session

from models.buckets import COLUMNS, unbalanced
from models.sync import Cents, backoff, cents_of_vba, landed, target, vba_of_cents
from models.tables import PUSHED, FlushAttempt
from models.vba import SubscriberAccum
from worker import failpoints
from worker.bulk import insert
from worker.db import session_scope, utcnow
from worker.logs import Log
from worker.settings import Settings, get_settings
from worker.store import KEY_COLS, T_ACCUM, T_PAIR, dead_letter
from worker.vba import BatchResult, VbaAuthError, VbaClient, VbaRejected, VbaUnavailable

log = Log("flush")
T_ATTEMPT = FlushAttempt.__table__  # type: ignore[attr-defined]
UPDATE_USER = "accumsync"


@cache
def client() -> VbaClient:
    """This process's VBA client (one token and one rate-limit bucket shared via Redis)."""
    return VbaClient(get_settings())


@dataclass
class Item:
    """One dirty accumulator as the flush sees it."""

    id: int
    key: tuple[str, ...]
    seq: int
    ours: Cents
    pushed: Cents
    intent: Cents | None
    attempts: int
    target: Cents = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def of(cls, row: Any) -> Item:
        intent = json.loads(row["intent_target"]) if row["intent_target"] else None
        return cls(
            id=row["id"],
            key=tuple(row[c] for c in KEY_COLS),
            seq=row["change_seq"],
            ours={c: row[c] for c in COLUMNS},
            pushed={c: row[p] for c, p in zip(COLUMNS, PUSHED, strict=True)},
            intent=intent,
            attempts=row["attempts"],
        )


@dataclass
class Report:
    """What one flush of a pair did (counts only: safe for logs and Flower)."""

    pair: int
    skipped: bool = False
    calls: int = 0
    sent: int = 0
    ok: int = 0
    retry: int = 0
    dead: int = 0
    recovered: int = 0
    unavailable: bool = False

    def summary(self) -> dict[str, int | bool]:
        return dict(vars(self))


class Flush:
    """One flush of one pair; ``run`` is the whole protocol."""

    def __init__(
        self, pair_id: int, vba: VbaClient, settings: Settings, rng: random.Random | None = None
    ) -> None:
        self.pair_id, self.vba, self.settings = pair_id, vba, settings
        self.rng = rng or random.Random()
        self.owner = f"{socket.gethostname()[:30]}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.report = Report(pair_id)
        self.subscriber_id = self.group_id = ""

    def run(self) -> Report:
        """Flush the pair if its lease is free; a no-op report otherwise."""
        if not self._lease():
            self.report.skipped = True
            return self.report
        try:
            self._flush()
        finally:
            self._release()
        return self.report

    # -- lease ------------------------------------------------------------------------------

    def _lease(self) -> bool:
        now = utcnow()
        free = or_(T_PAIR.c.lease_until.is_(None), T_PAIR.c.lease_until < now)
        until = now + timedelta(seconds=self.settings.flush_lease)
        with session_scope() as s:
            stmt = update(T_PAIR).where(T_PAIR.c.id == self.pair_id, free)
            done = s.execute(stmt.values(lease_owner=self.owner, lease_until=until))
            taken = cast(CursorResult[Any], done).rowcount
            row = s.execute(select(T_PAIR).where(T_PAIR.c.id == self.pair_id)).mappings().first()
        if row is not None:
            self.subscriber_id, self.group_id = row["subscriber_id"], row["group_id"]
        return bool(taken) and row is not None

    def _renew(self) -> None:
        until = utcnow() + timedelta(seconds=self.settings.flush_lease)
        with session_scope() as s:
            mine = and_(T_PAIR.c.id == self.pair_id, T_PAIR.c.lease_owner == self.owner)
            s.execute(update(T_PAIR).where(mine).values(lease_until=until))

    def _release(self) -> None:
        with session_scope() as s:
            mine = and_(T_PAIR.c.id == self.pair_id, T_PAIR.c.lease_owner == self.owner)
            values: dict[str, Any] = {"lease_owner": None, "lease_until": None}
            values.update(queued_until=None, last_flush_at=utcnow())
            s.execute(update(T_PAIR).where(mine).values(**values))

    # -- the protocol -----------------------------------------------------------------------

    def _flush(self) -> None:
        items = self._due_items()
        if not items:
            return
        try:
            remote = self._remote(items)
        except (VbaUnavailable, VbaAuthError) as exc:
            self._pair_unavailable(exc)
            return
        items = self._recover(items, remote)
        ready = self._targets(items, remote)
        size = self.settings.vba_batch_max
        for start in range(0, len(ready), size):
            if not self._send(ready[start : start + size]):
                return
        self._pair_recovered()

    def _due_items(self) -> list[Item]:
        now = utcnow()
        a, p = T_ACCUM.c, T_PAIR.c
        with session_scope() as s:
            pair_due = s.execute(
                select(p.id).where(
                    p.id == self.pair_id, or_(p.next_attempt_at.is_(None), p.next_attempt_at <= now)
                )
            ).first()
            if pair_due is None:
                return []
            rows = s.execute(
                select(T_ACCUM)
                .where(a.pair_id == self.pair_id, a.held.is_(False))
                .where(or_(a.dirty_since.is_not(None), a.intent_target.is_not(None)))
                .where(or_(a.next_attempt_at.is_(None), a.next_attempt_at <= now))
                .order_by(*[a[c] for c in KEY_COLS])
            ).mappings()
            return [Item.of(r) for r in rows]

    def _remote(self, items: list[Item]) -> dict[tuple[str, ...], SubscriberAccum] | None:
        """VBA's rows for the pair, when the ownership or an unknown outcome needs them."""
        if self.settings.ownership == "exclusive" and all(i.intent is None for i in items):
            return None
        rows = self.vba.iter_accumulators(self.subscriber_id, self.group_id)
        return {r.key: r for r in rows}

    def _recover(
        self, items: list[Item], remote: dict[tuple[str, ...], SubscriberAccum] | None
    ) -> list[Item]:
        """Settle intents of unknown outcome, then drop items VBA already holds our share of.

        An intent whose target equals VBA's row landed: our share as of the intent is confirmed.
        Any other intent did not land (or cannot be told apart from that) and is sent again.
        """
        pending = []
        for item in items:
            if item.intent is not None and remote is not None:
                row = remote.get(item.key)
                if landed(cents_of_vba(row.amounts()) if row else None, item.intent):
                    snapshot = self._intent_snapshot(item.id)
                    self._confirm(item.id, snapshot)
                    item.pushed = snapshot[0]
                    self.report.recovered += 1
                else:
                    self._clear_intent(item.id)
                item.intent = None
            if item.ours == item.pushed:  # nothing of ours to change: clean, no call needed
                self._confirm(item.id, (item.ours, item.seq))
                continue
            pending.append(item)
        return pending

    def _targets(
        self, items: list[Item], remote: dict[tuple[str, ...], SubscriberAccum] | None
    ) -> list[Item]:
        """Each item's absolute target; unbalanced or unsendable items become dead letters."""
        ready = []
        for item in items:
            if broken := unbalanced(item.ours):
                self._dead(item, f"ledger invariant: total != in + out for {', '.join(broken)}")
                continue
            row = remote.get(item.key) if remote is not None else None
            remote_cents = cents_of_vba(row.amounts()) if row is not None else None
            item.target = target(item.ours, item.pushed, remote_cents, self.settings.ownership)
            if row is not None:
                item.extra = {"added_Accum": row.added_Accum, "entry_Date": row.entry_Date,
                              "entry_User": row.entry_User}  # fmt: skip
            ready.append(item)
        return ready

    def _send(self, chunk: list[Item]) -> bool:
        """One batch call; returns False when VBA is unavailable (stop this flush)."""
        records, sendable = self._records(chunk)
        if not sendable:
            return True
        self._record_intents(sendable)
        failpoints.hit("flush.after_intent")
        self._renew()
        started = time.perf_counter()
        try:
            result = self.vba.upsert_accumulators(self.subscriber_id, self.group_id, records)
        except (VbaUnavailable, VbaAuthError) as exc:
            self._audit(sendable, started, "unavailable", exc=exc)
            self._pair_unavailable(exc)
            return False
        except VbaRejected as exc:
            self._audit(sendable, started, "rejected", exc=exc)
            for item in sendable:
                self._clear_intent(item.id)
                self._dead(item, f"VBA refused the batch ({exc.status}): {exc}", exc.activity_id)
            return True
        failpoints.hit("flush.after_put")
        self.report.calls += 1
        self.report.sent += len(sendable)
        self._apply(sendable, result)
        self._audit(sendable, started, "ok", result=result)
        return True

    def _records(self, chunk: list[Item]) -> tuple[list[SubscriberAccum], list[Item]]:
        records, sendable = [], []
        for item in chunk:
            body: dict[str, Any] = dict(zip(
                ("subscriber_ID", "group_ID", "plan_Year", "plan_Type", "benefit_Code"), item.key,
                strict=True))  # fmt: skip
            body.update(vba_of_cents(item.target), update_User=UPDATE_USER, **item.extra)
            try:
                records.append(SubscriberAccum.model_validate(body))
            except ValidationError as exc:
                self._dead(item, f"record fails VBA's field rules: {exc.errors()[0]['msg']}")
                continue
            sendable.append(item)
        return records, sendable

    def _apply(self, items: list[Item], result: BatchResult) -> None:
        """Settle each item from its own 207 entry, found by key, never by position."""
        for item in items:
            found = result.find(item.key)
            if found is None:  # VBA did not say: unknown outcome, the intent stays for recovery
                self._retry(item, f"no 207 item for key (activity {result.activity_id})")
            elif found.ok:
                self._confirm(item.id, (item.ours, item.seq))
                self.report.ok += 1
            elif found.retryable:
                self._clear_intent(item.id)
                self._retry(item, f"VBA item status {found.status}: {found.body}")
            else:
                self._clear_intent(item.id)
                reason = f"VBA refused the record ({found.status}): {found.body}"
                self._dead(item, reason, result.activity_id)

    # -- bookkeeping ------------------------------------------------------------------------

    def _record_intents(self, items: list[Item]) -> None:
        """Write-ahead: the targets and our snapshot, durable before the PUT leaves."""
        now = utcnow()
        with session_scope() as s:
            for item in items:
                values = {
                    "intent_target": json.dumps(item.target),
                    "intent_ours": json.dumps(item.ours),
                    "intent_seq": item.seq,
                    "intent_at": now,
                }
                s.execute(update(T_ACCUM).where(T_ACCUM.c.id == item.id).values(**values))

    def _intent_snapshot(self, item_id: int) -> tuple[Cents, int]:
        with session_scope() as s:
            row = s.execute(
                select(T_ACCUM.c.intent_ours, T_ACCUM.c.intent_seq).where(T_ACCUM.c.id == item_id)
            ).one()
        return json.loads(row[0]), int(row[1])

    def _confirm(self, item_id: int, snapshot: tuple[Cents, int]) -> None:
        """VBA holds our share as of ``snapshot``: record it; clean unless changed since."""
        ours, seq = snapshot
        a = T_ACCUM.c
        with session_scope() as s:
            values: dict[str, Any] = {p: ours[c] for c, p in zip(COLUMNS, PUSHED, strict=True)}
            values.update(pushed_seq=seq, attempts=0, next_attempt_at=None, **_NO_INTENT)
            s.execute(update(T_ACCUM).where(a.id == item_id).values(**values))
            s.execute(
                update(T_ACCUM).where(a.id == item_id, a.change_seq == seq).values(dirty_since=None)
            )

    def _clear_intent(self, item_id: int) -> None:
        with session_scope() as s:
            s.execute(update(T_ACCUM).where(T_ACCUM.c.id == item_id).values(**_NO_INTENT))

    def _retry(self, item: Item, reason: str) -> None:
        """Try the item again later, or give up into the dead letters after max attempts."""
        attempts = item.attempts + 1
        if attempts >= self.settings.max_attempts:
            self._clear_intent(item.id)
            self._dead(item, f"gave up after {attempts} attempts: {reason}")
            return
        s_ = self.settings
        delay = backoff(attempts, s_.backoff_base, s_.backoff_max, self.rng)
        when = utcnow() + timedelta(seconds=delay)
        with session_scope() as s:
            stmt = update(T_ACCUM).where(T_ACCUM.c.id == item.id)
            s.execute(stmt.values(attempts=attempts, next_attempt_at=when))
        self.report.retry += 1
        log.info("flush.item_retry", pair=self.pair_id, accumulator=item.id, attempt=attempts,
                 retry_in_s=round(delay, 1))  # fmt: skip

    def _dead(self, item: Item, reason: str, activity_id: str | None = None) -> None:
        """Hold the item out of later flushes and record why, with VBA's activityId."""
        payload = {"accumulator_id": item.id, "key": list(item.key), "target": item.target}
        now = utcnow()
        with session_scope() as s:
            s.execute(update(T_ACCUM).where(T_ACCUM.c.id == item.id).values(held=True))
            dead_letter(s, "flush", payload, reason, now,
                        accumulator_id=item.id, activity_id=activity_id)  # fmt: skip
        self.report.dead += 1
        log.warning("flush.dead_letter", pair=self.pair_id, accumulator=item.id,
                    activity_id=activity_id)  # fmt: skip

    def _pair_unavailable(self, exc: VbaUnavailable | VbaAuthError) -> None:
        """VBA is down or refusing us: back the whole pair off; items keep their attempts."""
        self.report.unavailable = True
        retry_after = exc.retry_after if isinstance(exc, VbaUnavailable) else None
        with session_scope() as s:
            row = s.execute(select(T_PAIR.c.attempts).where(T_PAIR.c.id == self.pair_id)).one()
            attempts = int(row[0]) + 1
            st = self.settings
            delay = backoff(attempts, st.backoff_base, st.backoff_max, self.rng, retry_after)
            values = {"attempts": attempts, "last_error": f"{type(exc).__name__}: {exc}"}
            values["next_attempt_at"] = utcnow() + timedelta(seconds=delay)
            s.execute(update(T_PAIR).where(T_PAIR.c.id == self.pair_id).values(**values))
        log.warning("flush.vba_unavailable", pair=self.pair_id, attempt=attempts,
                    retry_in_s=round(delay, 1), status=exc.status,
                    activity_id=exc.activity_id)  # fmt: skip

    def _pair_recovered(self) -> None:
        with session_scope() as s:
            values = {"attempts": 0, "next_attempt_at": None, "last_error": None}
            s.execute(update(T_PAIR).where(T_PAIR.c.id == self.pair_id).values(**values))

    def _audit(
        self,
        items: list[Item],
        started: float,
        outcome: str,
        result: BatchResult | None = None,
        exc: Exception | None = None,
    ) -> None:
        """One flush_attempt row per batch call: what was sent and what VBA said."""
        statuses = Counter(str(i.status) for i in result.items) if result else Counter[str]()
        row = {
            "pair_id": self.pair_id,
            "started_at": utcnow(),
            "duration_ms": int((time.perf_counter() - started) * 1000),
            "items": len(items),
            "http_status": 207 if result else getattr(exc, "status", None),
            "statuses": json.dumps(dict(statuses)),
            "outcome": outcome if not result or all(i.ok for i in result.items) else "partial",
            "activity_id": (result.activity_id if result else getattr(exc, "activity_id", None)),
            "error": None if exc is None else f"{type(exc).__name__}: {exc}"[:2000],
        }
        with session_scope() as s:
            s.execute(insert(s, T_ATTEMPT).values(row))
        log.info("flush.sent", pair=self.pair_id, items=len(items), outcome=row["outcome"],
                 status=row["http_status"], activity_id=row["activity_id"])  # fmt: skip


_NO_INTENT: dict[str, Any] = {
    "intent_target": None,
    "intent_ours": None,
    "intent_seq": None,
    "intent_at": None,
}


def flush_pair(pair_id: int, vba: VbaClient | None = None) -> Report:
    """Flush one pair with this process's client and settings."""
    return Flush(pair_id, vba or client(), get_settings()).run()


def vba_paused() -> float:
    """Seconds VBA calls stay paused fleet-wide (the breaker); 0 when they may go."""
    if not get_settings().vba_base_url:
        return 0.0
    try:
        return client().paused()
    except RedisError:  # the breaker's Redis is away: let the flush find out for itself
        return 0.0


def due_pairs(session: Session, now: datetime, limit: int = 10_000) -> list[int]:
    """Pairs with dirty keys or unknown outcomes whose retry time has come, oldest first."""
    a, p = T_ACCUM.c, T_PAIR.c
    query = (
        select(p.id)
        .join(T_ACCUM, a.pair_id == p.id)
        .where(a.held.is_(False))
        .where(or_(a.dirty_since.is_not(None), a.intent_target.is_not(None)))
        .where(or_(a.next_attempt_at.is_(None), a.next_attempt_at <= now))
        .where(or_(p.next_attempt_at.is_(None), p.next_attempt_at <= now))
        .where(or_(p.queued_until.is_(None), p.queued_until < now))
        .where(or_(p.lease_until.is_(None), p.lease_until < now))
        .group_by(p.id)
        .order_by(func.min(a.dirty_since))
        .limit(limit)
    )
    return [int(r[0]) for r in session.execute(query)]


def mark_queued(session: Session, pair_ids: list[int], until: datetime) -> None:
    """Note that a flush task is queued for these pairs, so beat does not queue them twice."""
    for start in range(0, len(pair_ids), 900):
        part = pair_ids[start : start + 900]
        session.execute(update(T_PAIR).where(T_PAIR.c.id.in_(part)).values(queued_until=until))
