"""The flush protocol (docs/design.md, "The fenced lease") for one (subscriber, group) pair,
in three transactions per batch call, every write fenced by the pair's lease generation.

1. **Lease and load.** Taking the lease bumps ``pair.lease_gen`` and sets ``lease_until`` by the
   database's clock; the pair's due accumulators are loaded in the same transaction.
2. **Read, decide, record, send.** Per chunk of ``vba_batch_max`` keys: read VBA's rows (shared
   ownership) right before the PUT, decide each key with the pure rules of ``models.sync``
   (settle an earlier write of unknown outcome, then send, confirm, wait, hold or refuse), and
   record the decisions and intents in one transaction that the client runs right before the
   request leaves (after its rate limiter): it renews the lease and checks it first.
3. **Settle.** Read each 207 item by key; an unknown outcome (item 5xx, no item) is settled at
   once by reading VBA's row again; the outcomes are written in one last fenced transaction,
   which also renews (more chunks) or releases the lease.

A fenced transaction starts by renewing the lease on the condition that its generation is
still ours (``Lease.renew``); that statement holds the pair's row lock until commit, so no other
flush can take the lease between the check and the writes. A holder that lost its lease
raises :class:`LeaseLost` there, sends nothing more and writes nothing.
"""

from __future__ import annotations

import json
import os
import random
import socket
import time
import uuid
from collections import Counter
from collections.abc import Callable, Generator, Iterator, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import Any, TypeVar

from pydantic import ValidationError
from sqlalchemy import RowMapping, or_, select, update
from sqlmodel import Session

from models.buckets import COLUMNS
from models.events import canon
from models.sync import (
    ZERO,
    Act,
    Cents,
    Decision,
    Fate,
    Intent,
    Item,
    LetterKind,
    after_send,
    backoff,
    cents_of_vba,
    plan,
    vba_of_cents,
)
from models.tables import PUSHED
from models.vba import SUBSCRIBER_KEY, RemoteAccum, SubscriberAccum
from worker import failpoints
from worker.db import as_utc, db_after, db_now, in_transaction, insert, session_scope
from worker.logs import Log
from worker.settings import Settings, get_settings
from worker.store import counters
from worker.store.bulk import update_rows
from worker.store.dead_letters import dead_letter
from worker.store.tables import KEY_COLS, T_ACCUM, T_ATTEMPT, T_PAIR, awaits_flush
from worker.vba import BatchResult, VbaClient, VbaError, VbaUnavailable
from worker.vba.errors import refuses_data
from worker.vba.fleet import client

log = Log("flush")
T = TypeVar("T")
SORT_BY = "plan_Year:asc,plan_Type:asc,benefit_Code:asc"
"""A stable list order, so paging can't skip a row that would then be taken as absent."""


class LeaseLost(Exception):
    """Another flush took this pair's lease: this one stops, writing and sending nothing."""


@dataclass
class FlushReport:
    """What one flush of a pair did (counts only: safe for logs and Flower)."""

    pair: int
    skipped: bool = False
    lease_lost: bool = False
    calls: int = 0
    sent: int = 0
    ok: int = 0
    recovered: int = 0
    retry: int = 0
    waiting: int = 0
    held: int = 0
    dead: int = 0
    unavailable: bool = False

    def summary(self) -> dict[str, int | bool]:
        return dict(vars(self))


@dataclass
class Exchange:
    """One HTTP batch call of a chunk: how many records, and what came back."""

    items: int
    started: float
    result: BatchResult | None = None
    error: VbaError | None = None
    read_to_put_ms: int | None = None
    """Shared: from VBA's first answer to our read until this request left."""


@dataclass
class Call:
    """One chunk's batch PUT, split in halves when VBA refuses it as a whole: what went, what
    came back for each record, and whether the pair must back off."""

    plans: list[Decision]
    records: list[SubscriberAccum]
    recorded: bool = False
    read_at: float | None = None
    answers: dict[int, BatchResult | VbaError] = field(default_factory=dict)
    exchanges: list[Exchange] = field(default_factory=list)
    stop: VbaError | None = None
    outcomes: list[Decision] = field(default_factory=list)

    @property
    def sending(self) -> list[Decision]:
        """The SEND decisions, in the order of ``records``."""
        return [p for p in self.plans if p.act is Act.SEND]

    def unwritten(self) -> list[Decision]:
        """What is still to write once the call is over: its outcomes, and the other decisions
        too when the request never got as far as recording them."""
        others = [] if self.recorded else [p for p in self.plans if p.act is not Act.SEND]
        return others + self.outcomes


def stops(error: VbaError) -> bool:
    """A whole-call failure of VBA's or ours (not of the records'): the pair backs off. A
    refusal of the data (400, 404, 409, 422...) refuses records instead."""
    return not refuses_data(error)


def call_finished(answer: BatchResult | VbaError | None) -> bool:
    """VBA's side is done with the request (it answered), so its rows tell what happened."""
    if isinstance(answer, BatchResult):
        return True
    return isinstance(answer, VbaUnavailable) and not answer.may_still_land


class Remote:
    """VBA's rows of a pair by canonical key, the keys whose row could not be read, and when
    its first page was answered (the read-to-write window starts there)."""

    def __init__(self) -> None:
        self.rows: dict[tuple[str, ...], RemoteAccum] = {}
        self.unreadable: dict[tuple[str, ...], str] = {}
        self.first_answer_at: float | None = None

    def add(self, row: RemoteAccum) -> None:
        """One listed row. Two rows with one canonical key (VBA compared keys with case, or a
        page repeated a row that changed in between) cannot be told apart: the key is refused
        as unreadable rather than one of them taken for it."""
        key = canonical(row.key)
        seen = self.rows.get(key)
        if key in self.unreadable or (seen is not None and seen != row):
            self.rows.pop(key, None)
            self.unreadable[key] = (
                "VBA listed two rows for this key (spellings or amounts differ): which one a "
                "write of ours would land on can't be told"
            )
            return
        self.rows[key] = row


class Unattributable(Exception):
    """VBA listed a row whose key can't be read: any key of ours could be that row."""


def canonical(key: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(canon(v) for v in key)


def read_remote(
    vba: VbaClient,
    subscriber_id: str,
    group_id: str,
    before_page: Callable[[], object] | None = None,
) -> Remote:
    """VBA's rows for the pair, every page, in a stable order, by canonical key; raises
    :class:`Unattributable` for a listed row whose key can't be read."""
    remote = Remote()
    for page in vba.pages(subscriber_id, group_id, sort_by=SORT_BY, before_page=before_page):
        if remote.first_answer_at is None:
            remote.first_answer_at = time.perf_counter()
        for row in page.items:
            remote.add(row)
        for key, why in page.unreadable:
            if key is None:
                raise Unattributable(f"VBA listed a row whose key can't be read: {why}")
            remote.unreadable[canonical(key)] = why
    return remote


class Lease:
    """A pair's flush lease: taken by bumping its generation, fenced on it afterwards."""

    def __init__(self, pair_id: int, seconds: float) -> None:
        self.pair_id, self.seconds = pair_id, seconds
        self.owner = f"{socket.gethostname()[:30]}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.gen: int | None = None

    def take(self, session: Session) -> RowMapping | None:
        """Take the lease if it is free and the pair is due (database clock); the pair's row."""
        p = T_PAIR.c
        free = or_(p.lease_until.is_(None), p.lease_until < db_now())
        due = or_(p.next_attempt_at.is_(None), p.next_attempt_at <= db_now())
        stmt = (
            update(T_PAIR)
            .where(p.id == self.pair_id, free, due)
            .values(
                lease_gen=p.lease_gen + 1,
                lease_owner=self.owner,
                lease_until=db_after(self.seconds),
            )
            .returning(
                p.lease_gen,
                p.subscriber_id,
                p.group_id,
                p.attempts,
                p.last_flush_at,
                db_now().label("now"),
            )
        )
        row = session.execute(stmt).mappings().first()
        if row is not None:
            self.gen = int(row["lease_gen"])
        return row

    def renew(self, session: Session) -> datetime:
        """Extend the lease if it is still ours, holding the pair's row lock until commit;
        returns the database's clock. :class:`LeaseLost` otherwise."""
        p = T_PAIR.c
        stmt = (
            update(T_PAIR)
            .where(p.id == self.pair_id, p.lease_gen == self.gen)
            .values(lease_until=db_after(self.seconds))
            .returning(db_now().label("now"))
        )
        now = session.execute(stmt).scalar()
        if now is None:
            raise LeaseLost(f"pair {self.pair_id}: lease generation {self.gen} was taken over")
        return as_utc(now)

    def release(self, session: Session, now: datetime, **pair: Any) -> None:
        """Give the lease up (with the pair's new retry state); fenced like every write."""
        p = T_PAIR.c
        values = {"lease_owner": None, "lease_until": None, "queued_until": None} | pair
        stmt = update(T_PAIR).where(p.id == self.pair_id, p.lease_gen == self.gen)
        session.execute(stmt.values(last_flush_at=now, **values))


class Flush:
    """One flush of one pair; ``run`` is the whole protocol, ``steps`` the same in steps."""

    def __init__(
        self, pair_id: int, vba: VbaClient, settings: Settings, rng: random.Random | None = None
    ) -> None:
        self.pair_id, self.vba, self.settings = pair_id, vba, settings
        self.rng = rng or random.Random()
        self.lease = Lease(pair_id, settings.flush_lease)
        self.report = FlushReport(pair_id)
        self.subscriber_id = self.group_id = ""
        self.pair_attempts = 0
        #: When the flush read its keys (the database's clock): a change it did not send came
        #: after it.
        self.taken_at: datetime | None = None

    def run(self) -> FlushReport:
        """Flush the pair if its lease is free and it is due; a no-op report otherwise."""
        for _ in self.steps():
            pass
        return self.report

    def steps(self) -> Iterator[str]:
        """The protocol, pausing after each step another flush could interleave with (tests
        drive two of them step by step; abandoning one mid-way is a crash: nothing cleans up)."""
        items = self._take()
        if items is None:
            self.report.skipped = True
            return
        yield "leased"
        try:
            size = self.settings.vba_batch_max
            chunks = [items[i : i + size] for i in range(0, len(items), size)]
            for n, chunk in enumerate(chunks, start=1):
                if not (yield from self._chunk(chunk, last=n == len(chunks))):
                    return
        except LeaseLost as exc:
            self.report.lease_lost = True
            log.warning("flush.lease_lost", pair=self.pair_id, error=str(exc))
        except Exception as exc:
            self._record_failure(exc)
            raise

    def _record_failure(self, exc: Exception) -> None:
        """A failure of ours (a bug, the store away): back the pair off with its reason if the
        store lets us; otherwise the lease lapses and the pair is flushed again."""
        try:
            self._fenced(lambda s, now: self._back_off(s, now, exc))
        except Exception as again:
            log.error("flush.failure_not_recorded", pair=self.pair_id, error=type(again).__name__)

    # -- steps ------------------------------------------------------------------------------

    def _take(self) -> list[Item] | None:
        """Lease and load, one transaction; None when the lease is busy or the pair not due."""
        with session_scope() as s:
            row = self.lease.take(s)
            if row is None:
                return None
            self.subscriber_id, self.group_id = row["subscriber_id"], row["group_id"]
            self.pair_attempts, now = int(row["attempts"]), as_utc(row["now"])
            self.taken_at = now
            self._date_orphans(s, row["last_flush_at"], now)
            items = [self._item(r, now) for r in self._due(s)]
            if not items:
                self.lease.release(s, now)
        return items or None

    def _date_orphans(self, session: Session, released: datetime | None, now: datetime) -> None:
        """Intents recorded after the pair's last release belong to a flush that never ended
        (killed, stalled, or its lease taken over): its requests may have left as late as its
        lease lasted, which is no later than now, so each may still land until a grace from
        now. (An intent's ``intent_at`` is the latest moment a request of it may have left;
        NULL once none can land.)"""
        a = T_ACCUM.c
        orphan = [a.pair_id == self.pair_id, a.intent_target.is_not(None), a.intent_at.is_not(None)]
        if released is not None:
            orphan.append(a.intent_at > released)
        session.execute(update(T_ACCUM).where(*orphan).values(intent_at=now))

    def _due(self, session: Session) -> Sequence[RowMapping]:
        a = T_ACCUM.c
        query = (
            select(T_ACCUM)
            .where(a.pair_id == self.pair_id, awaits_flush())
            .where(or_(a.next_attempt_at.is_(None), a.next_attempt_at <= db_now()))
            .order_by(*[a[c] for c in KEY_COLS])
        )
        return session.execute(query).mappings().all()

    def _item(self, row: RowMapping, now: datetime) -> Item:
        intent = None
        if row["intent_target"]:
            before = json.loads(row["intent_before"]) if row["intent_before"] else None
            intent = Intent(
                json.loads(row["intent_target"]),
                json.loads(row["intent_ours"]),
                int(row["intent_seq"]),
                before,
            )
        grace = timedelta(seconds=self.settings.settle_grace)
        fresh = row["intent_at"] is not None and as_utc(row["intent_at"]) + grace > now
        return Item(
            id=row["id"],
            key=tuple(row[c] for c in KEY_COLS),
            seq=row["change_seq"],
            ours={c: row[c] for c in COLUMNS},
            pushed={c: row[p] for c, p in zip(COLUMNS, PUSHED, strict=True)},
            intent=intent,
            attempts=row["attempts"],
            intent_fresh=fresh,
        )

    def _chunk(self, chunk: list[Item], last: bool) -> Generator[str, None, bool]:
        """Read, decide, send and settle one chunk (a generator returning False when the pair
        backed off and released its lease)."""
        remote: Remote | None = None
        read_at = None
        if self.settings.ownership == "shared":
            try:
                remote = self._read()
            except (VbaError, Unattributable) as exc:
                failed: Exception = exc
                self._fenced(lambda s, now: self._back_off(s, now, failed))
                return False
            read_at = remote.first_answer_at
            yield "read"
        decided = [self._decide(i, remote) for i in chunk]
        call = Call(*self._sendable(decided, remote))
        call.read_at = read_at
        if call.records:
            self._send(call)
            yield "sent"
            failpoints.hit("flush.after_put")
            self._settle(call)
        self._fenced(lambda s, now: self._finish_chunk(s, now, call, last))
        self._tally(call)
        return call.stop is None

    @property
    def _mode(self) -> Any:
        return self.settings.ownership

    def _read(self, then_put: bool = True) -> Remote:
        """VBA's rows for the pair, every page, in a stable order, by canonical key; the PUT's
        rate-limit token is taken with the read's, so it leaves right after (client.prepay)."""
        self.vba.prepay(2 if then_put else 1)
        return read_remote(self.vba, self.subscriber_id, self.group_id)

    def _decide(self, item: Item, remote: Remote | None) -> Decision:
        """:func:`models.sync.plan` for the key, unless VBA's row for it can't be taken as it
        is: then the key is refused (a dead letter) and the rest of the pair goes on."""
        if remote is not None:
            why = remote.unreadable.get(item.key)
            row = remote.rows.get(item.key)
            if why is None and row is not None and (fields := row.sub_cent()):
                why = f"more than 2 decimals in {', '.join(fields)}: cents are all we keep"
            if why is not None:
                reason = f"VBA's row can't be read as it is ({why}); fix it in VBA, then replay"
                return Decision(
                    item,
                    Act.REFUSE,
                    kind=LetterKind.UNREADABLE,
                    reason=reason,
                    keep_intent=item.intent is not None,  # settled once the row reads again
                )
        return plan(item, self._cents(item, remote), self._mode)

    @staticmethod
    def _cents(item: Item, remote: Remote | None) -> Cents | None:
        if remote is None:
            return None
        row = remote.rows.get(item.key)
        return cents_of_vba(row.amounts()) if row is not None else dict(ZERO)

    def _sendable(
        self, plans: list[Decision], remote: Remote | None
    ) -> tuple[list[Decision], list[SubscriberAccum]]:
        """The wire record of each SEND; one that fails VBA's field rules is refused instead."""
        out, records = [], []
        for p in plans:
            if p.act is Act.SEND:
                row = remote.rows.get(p.item.key) if remote is not None else None
                try:
                    records.append(self._record(p, row, known_absent=remote is not None))
                except ValidationError as exc:
                    why = f"record fails VBA's field rules: {exc.errors()[0]['msg']}"
                    p = replace(p, act=Act.REFUSE, kind=LetterKind.UNSENDABLE, reason=why)
            out.append(p)
        return out, records

    def _record(self, p: Decision, row: RemoteAccum | None, known_absent: bool) -> SubscriberAccum:
        """The full record we write: VBA's own spelling of the key when it has the row, our
        name in its audit trail, VBA's flag kept; no null, nothing we don't set."""
        assert p.target is not None
        user = self.settings.vba_audit_user
        body: dict[str, Any] = dict(
            zip(SUBSCRIBER_KEY, row.key if row else p.item.key, strict=True)
        )
        body.update(vba_of_cents(p.target), update_User=user)
        if row is not None and row.added_Accum is not None:
            body["added_Accum"] = row.added_Accum
        if row is None and known_absent:
            body["entry_User"] = user
        return SubscriberAccum.model_validate(body)

    def _send(self, call: Call) -> None:
        """The PUT; the decisions and intents are recorded right before it leaves."""
        self._put(call, list(range(len(call.records))))

    def _before_send(self, call: Call, which: list[int], exchange: Exchange) -> None:
        """Right before a request leaves: the first records the call's decisions and intents,
        each later one (a resend after a 401 or a refused connection, a half) dates the intents
        it carries anew, since they may land until a grace after it. Both renew the lease."""
        if call.recorded:
            ids = [call.sending[i].item.id for i in which]
            self._fenced(lambda s, now: self._redate(s, now, ids))
        else:
            self._fenced(lambda s, now: self._record_plans(s, now, call.plans))
            call.recorded = True
            failpoints.hit("flush.after_intent")
        if call.read_at is not None:
            exchange.read_to_put_ms = round((time.perf_counter() - call.read_at) * 1000)

    def _put(self, call: Call, which: list[int]) -> None:
        """PUT the records ``which``; a whole-call refusal of their data is split in halves
        until the refused records stand alone (about 2 * log2(n) more calls for one of n)."""
        exchange = Exchange(len(which), time.perf_counter())
        call.exchanges.append(exchange)
        records = [call.records[i] for i in which]
        try:
            exchange.result = self.vba.upsert_accumulators(
                self.subscriber_id,
                self.group_id,
                records,
                before_send=lambda: self._before_send(call, which, exchange),
            )
        except VbaError as exc:
            exchange.error = exc
            if not stops(exc) and len(which) > 1:
                log.info("flush.split", pair=self.pair_id, items=len(which), status=exc.status)
                half = len(which) // 2
                self._put(call, which[:half])
                if call.stop is None:
                    self._put(call, which[half:])
                return
            call.stop = exc if stops(exc) else None
            call.answers |= dict.fromkeys(which, exc)
            return
        self.report.calls += 1
        self.report.sent += len(which)
        call.answers |= dict.fromkeys(which, exchange.result)

    def _settle(self, call: Call) -> None:
        """Each SEND's outcome; unknown ones settled at once by reading VBA's rows again."""
        answers = [call.answers.get(i) for i in range(len(call.records))]
        fates = [self._fate(call, p, a) for p, a in zip(call.sending, answers, strict=True)]
        remote = None
        finished = [
            call_finished(a) for a, f in zip(answers, fates, strict=True) if f is Fate.UNKNOWN
        ]
        if self._mode == "shared" and any(finished):
            try:
                remote = self._read(then_put=False)  # VBA is done: its rows are final
            except (VbaError, Unattributable) as exc:
                log.warning("flush.settle_read_failed", pair=self.pair_id, error=type(exc).__name__)
        call.outcomes = [
            self._after(p, fate, answer, remote if call_finished(answer) else None)
            for p, fate, answer in zip(call.sending, fates, answers, strict=True)
        ]

    def _fate(self, call: Call, p: Decision, answer: BatchResult | VbaError | None) -> Fate:
        if answer is None:  # never sent: an earlier half stopped the call
            return Fate.NOT_SENT
        if isinstance(answer, VbaError):
            if not stops(answer):
                return Fate.REFUSED  # VBA refused this record's data: nothing was written
            if not call.recorded or not getattr(answer, "may_have_landed", False):
                return Fate.NOT_SENT
            return Fate.UNKNOWN
        found = answer.find(p.item.key)
        if found is None or found.retryable:
            return Fate.UNKNOWN
        return Fate.CONFIRMED if found.ok else Fate.REFUSED

    def _after(
        self, p: Decision, fate: Fate, answer: BatchResult | VbaError | None, remote: Remote | None
    ) -> Decision:
        whole_call = not isinstance(answer, BatchResult)
        done = after_send(
            p,
            fate,
            self._cents(p.item, remote),
            ownership=self._mode,
            max_attempts=self.settings.max_attempts,
            reason=self._reason(p, answer),
            counted=not whole_call or fate is Fate.REFUSED,
            finished=call_finished(answer),
        )
        return replace(done, activity_id=answer.activity_id if answer is not None else None)

    @staticmethod
    def _reason(p: Decision, answer: BatchResult | VbaError | None) -> str:
        if answer is None:
            return "not sent: the batch call stopped first"
        if isinstance(answer, VbaError):
            if not stops(answer):
                return f"VBA refused the record ({answer.status}): {answer}"
            return f"{type(answer).__name__}: {answer}"
        found = answer.find(p.item.key)
        if found is None:
            return f"no 207 item for the key (activity {answer.activity_id})"
        if found.ok or found.retryable:
            return f"VBA item status {found.status}: {found.body}"
        return f"VBA refused the record ({found.status}): {found.body}"

    # -- writes (each inside a fenced transaction) ------------------------------------------

    def _fenced(self, work: Callable[[Session, datetime], T]) -> T:
        """Run ``work`` in a transaction that first renews the lease, if it is still ours; a
        deadlock with ingest (its rows locked in another order) runs it again from the start."""
        return in_transaction(lambda s: work(s, self.lease.renew(s)))

    def _redate(self, session: Session, now: datetime, ids: list[int]) -> None:
        a = T_ACCUM.c
        session.execute(update(T_ACCUM).where(a.id.in_(ids)).values(intent_at=now))

    def _record_plans(self, session: Session, now: datetime, plans: list[Decision]) -> None:
        self._write(session, now, plans)

    def _finish_chunk(self, session: Session, now: datetime, call: Call, last: bool) -> None:
        """The chunk's outcomes, its audit rows, and the lease: renewed, or released."""
        self._write(session, now, call.unwritten())
        for exchange in call.exchanges:
            self._audit(session, now, exchange)
        if call.stop is not None:
            self._back_off(session, now, call.stop)
        elif last:
            self.lease.release(session, now, attempts=0, next_attempt_at=None, last_error=None)

    def _write(self, session: Session, now: datetime, plans: list[Decision]) -> None:
        """Every decision's row changes (bulk: one statement per shape of change) and its dead
        letter if any; a confirmed key is clean unless the ledger changed it since."""
        shapes: dict[tuple[str, ...], list[dict[str, Any]]] = {}
        confirmed = []
        for p in plans:
            row = {"id": p.item.id} | self._changes(p, now)
            shapes.setdefault(tuple(sorted(row)), []).append(row)
            if p.confirmed is not None:
                confirmed.append({"id": p.item.id, "change_seq": p.confirmed[1]})
            if p.act in (Act.HOLD, Act.REFUSE):
                self._dead_letter(session, now, p)
        for rows in shapes.values():
            update_rows(session, T_ACCUM, rows, match=["id"])
        if confirmed:
            bump_pushed_seq(session, [c["id"] for c in confirmed])
        clean = {"dirty_since": None}
        update_rows(session, T_ACCUM, confirmed, match=["id", "change_seq"], constant=clean)
        self._redate_changed(session, [c["id"] for c in confirmed])

    def _redate_changed(self, session: Session, ids: list[int]) -> None:
        """A confirmed key the ledger changed during this flush waits for that change alone,
        which came after the flush read the key: it is dated so, not by the change just sent
        (which would make a busy key look older than it is, ahead of keys that waited longer)."""
        if not ids or self.taken_at is None:
            return
        a = T_ACCUM.c
        stale = [a.id.in_(ids), a.dirty_since.is_not(None), a.dirty_since < self.taken_at]
        session.execute(update(T_ACCUM).where(*stale).values(dirty_since=self.taken_at))

    def _changes(self, p: Decision, now: datetime) -> dict[str, Any]:
        """The accumulator columns one decision sets."""
        row: dict[str, Any] = {}
        if p.confirmed is not None:
            ours, _ = p.confirmed
            row.update({pc: ours[c] for c, pc in zip(COLUMNS, PUSHED, strict=True)})
        if p.act is Act.SEND:
            intent = p.sent()
            row |= {
                "intent_target": json.dumps(intent.target),
                "intent_ours": json.dumps(intent.ours),
                "intent_seq": intent.seq,
                "intent_before": None if intent.before is None else json.dumps(intent.before),
                "intent_at": now,
            }
            return row
        if not p.keep_intent:
            row |= dict(_NO_INTENT)
        elif p.intent_done:
            row["intent_at"] = None  # no request of it can land now: settled at once next time
        if p.act is Act.CONFIRM:
            row |= {"attempts": 0, "next_attempt_at": None}
        elif p.act is Act.WAIT:
            row["next_attempt_at"] = now + timedelta(seconds=self.settings.settle_grace)
        elif p.act is Act.RETRY and p.counted:
            attempts, delay = p.item.attempts + 1, self._backoff(p.item.attempts + 1)
            row |= {"attempts": attempts, "next_attempt_at": now + delay}
            log.info(
                "flush.item_retry",
                pair=self.pair_id,
                accumulator=p.item.id,
                attempt=attempts,
                retry_in_s=round(delay.total_seconds(), 1),
            )
        elif p.act in (Act.HOLD, Act.REFUSE):
            row["held"] = True
        return row

    def _dead_letter(self, session: Session, now: datetime, p: Decision) -> None:
        """Hold the key out of later flushes and record why (never with amounts in the reason)."""
        payload = {"accumulator_id": p.item.id, "key": list(p.item.key), "kind": str(p.kind)}
        payload |= {"target": p.target, **p.detail} if p.target else dict(p.detail)
        if p.keep_intent and (intent := p.item.intent) is not None:
            # A write whose outcome is still unknown: kept, and settled once the key is sent.
            payload["unsettled_write"] = {"target": intent.target, "before": intent.before}
        dead_letter(
            session,
            "flush",
            payload,
            p.reason,
            now,
            accumulator_id=p.item.id,
            activity_id=p.activity_id,
            kind=str(p.kind),
        )
        event = "flush.held" if p.act is Act.HOLD else "flush.dead_letter"
        log.warning(
            event,
            pair=self.pair_id,
            accumulator=p.item.id,
            kind=str(p.kind),
            activity_id=p.activity_id,
        )

    def _tally(self, call: Call) -> None:
        """Count the chunk's decisions into the report, once each."""
        r = self.report
        for p in call.plans:
            intent = p.item.intent
            if intent is not None and p.confirmed == (intent.ours, intent.seq):
                r.recovered += 1
        done = [p for p in call.plans if p.act is not Act.SEND] + call.outcomes
        r.ok += sum(p.act is Act.CONFIRM for p in call.outcomes)
        r.retry += sum(p.act is Act.RETRY for p in done)
        r.waiting += sum(p.act is Act.WAIT for p in done)
        r.held += sum(p.act is Act.HOLD for p in done)
        r.dead += sum(p.act is Act.REFUSE for p in done)

    def _back_off(self, session: Session, now: datetime, exc: Exception) -> None:
        """The whole pair waits (VBA down, refusing us, or a failure of ours): the reason is
        recorded, items keep their attempts, the lease is released."""
        self.report.unavailable = isinstance(exc, VbaError)
        retry_after = exc.retry_after if isinstance(exc, VbaUnavailable) else None
        attempts = self.pair_attempts + 1
        delay = self._backoff(attempts, retry_after)
        reason = f"{type(exc).__name__}: {exc}"[:2000]
        self.lease.release(
            session, now, attempts=attempts, last_error=reason, next_attempt_at=now + delay
        )
        log.warning(
            "flush.backoff",
            pair=self.pair_id,
            attempt=attempts,
            retry_in_s=round(delay.total_seconds(), 1),
            error=type(exc).__name__,
            status=getattr(exc, "status", None),
            activity_id=getattr(exc, "activity_id", None),
        )

    def _backoff(self, attempt: int, retry_after: float | None = None) -> timedelta:
        s = self.settings
        delay = backoff(attempt, s.backoff_base, s.backoff_max, self.rng, retry_after)
        return timedelta(seconds=delay)

    def _audit(self, session: Session, now: datetime, exchange: Exchange) -> None:
        """One flush_attempt row per batch call: what was sent and what VBA said."""
        result, exc = exchange.result, exchange.error
        statuses = Counter(str(i.status) for i in result.items) if result else Counter[str]()
        if result is not None:
            outcome = "ok" if all(i.ok for i in result.items) else "partial"
        else:
            outcome = "unavailable" if isinstance(exc, VbaUnavailable) else "rejected"
        answer = result or exc
        row = {
            "pair_id": self.pair_id,
            "started_at": now,
            "duration_ms": int((time.perf_counter() - exchange.started) * 1000),
            "items": exchange.items,
            "http_status": 207 if result else getattr(exc, "status", None),
            "statuses": json.dumps(dict(statuses)),
            "outcome": outcome,
            "activity_id": answer.activity_id if answer is not None else None,
            "error": None if exc is None else f"{type(exc).__name__}: {exc}"[:2000],
            "read_to_put_ms": exchange.read_to_put_ms,
        }
        session.execute(insert(session, T_ATTEMPT).values(row))
        http = "none" if row["http_status"] is None else str(row["http_status"])
        counters.add(
            session, {f"calls.{outcome}.{http}": 1} | {f"items.{s}": n for s, n in statuses.items()}
        )
        log.info(
            "flush.sent",
            pair=self.pair_id,
            items=exchange.items,
            outcome=outcome,
            status=row["http_status"],
            activity_id=row["activity_id"],
            read_to_put_ms=exchange.read_to_put_ms,
        )


_NO_INTENT: dict[str, Any] = {
    "intent_target": None,
    "intent_ours": None,
    "intent_seq": None,
    "intent_before": None,
    "intent_at": None,
}


def bump_pushed_seq(session: Session, ids: list[int]) -> None:
    """Our confirmed share of these keys changed: ``pushed_seq`` moves on, so a reconcile that
    read the old share repairs nothing (every writer of ``pushed_*`` calls this)."""
    a = T_ACCUM.c
    session.execute(update(T_ACCUM).where(a.id.in_(ids)).values(pushed_seq=a.pushed_seq + 1))


def flush_pair(pair_id: int, vba: VbaClient | None = None) -> FlushReport:
    """Flush one pair with this process's client and settings."""
    return Flush(pair_id, vba or client(), get_settings()).run()
