"""The store's operations on the ledger: record a batch of raw events in one transaction.

Record, then fold. A message's transaction validates its events, decides each one against what
is stored for its event id and its (claim_id, version) (:func:`models.ledger.decide`: received,
duplicate or conflict), and records each event received once: one ``received_event`` row holding
the version it carries, under the message's ``ingest_batch`` row. It writes no claim and no
accumulator: the fold (worker/store/fold.py) applies committed batches to those in sets, so
whether a version is applied or stale is decided there, against the claim's highest version.

Batches run side by side, on the same claims or not. The two things they can share, an event id
and a claim version, are each held by one row (the event id's primary key; the version's unique
index, ``ux_received_event_version``, over the rows with a batch). So each is claimed by the
insert itself, which waits on the index for a concurrent batch holding the same id or version
and then skips it; the batch then decides that event against the row committed (see
:func:`record`). A batch waits only on what it shares, never on a whole claim: two versions of
one claim in concurrent batches are both recorded, and the fold applies the highest.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from functools import lru_cache
from typing import Any, Final

from pydantic import ValidationError
from sqlalchemy import (
    Executable,
    bindparam,
    delete,
    literal,
    select,
    union_all,
    update,
)
from sqlalchemy.dialects import postgresql
from sqlmodel import Session

from models.events import EVENT_BATCH, ClaimEvent, describe
from models.ledger import Kind, decide
from models.tables import CLAIM_CENTS
from worker.db import insert, is_postgres, utcnow
from worker.ingest import wire
from worker.store import counters
from worker.store.bulk import as_json, filled, recordset, rows_where_in, upsert
from worker.store.dead_letters import dead_letter
from worker.store.fold import BY_INDEX, fold_batches
from worker.store.tables import CENTS_OF, HOLDS_A_VERSION, KEY_COLS, T_BATCH, T_EVENT


@dataclass
class IngestCounts:
    """Outcome counts of one ingested batch, by :class:`models.ledger.Kind` (no member data:
    safe for logs and Flower)."""

    received: int = 0
    applied: int = 0
    duplicate: int = 0
    stale: int = 0
    conflict: int = 0
    invalid: int = 0
    reasons: list[str] = field(default_factory=list)
    recorded: int = 0
    """Versions recorded for the fold and not folded yet (Postgres: the fold counts them as
    applied or stale once it has run)."""

    def merged(self, other: IngestCounts) -> IngestCounts:
        """The outcome of two parts of one message, summed."""
        counts = {k: v + getattr(other, k) for k, v in self.summary().items()}
        return IngestCounts(
            **counts, reasons=self.reasons + other.reasons, recorded=self.recorded + other.recorded
        )

    def summary(self) -> dict[str, int]:
        """Every outcome's count, in the vocabulary's order."""
        return {kind.value: getattr(self, kind.value) for kind in Kind}


Valid = list[tuple[ClaimEvent, str, int]]
"""(event, content hash, its position in the batch)."""
Rejects = list[tuple[Any, str]]


def validate(raw: Sequence[Any]) -> tuple[Valid, Rejects]:
    """Split raw items into (event, content hash, position) triples and (raw item, reason)
    rejects.

    The batch is validated in one call; a batch with an invalid item is validated item by item
    instead, so each reject gets its own reason and the rest of the batch goes on."""
    events = whole(raw)
    if events is not None:
        return [(e, e.content_hash(), i) for i, e in enumerate(events)], []
    good: Valid = []
    bad: Rejects = []
    for i, item in enumerate(raw):
        if not isinstance(item, dict):
            bad.append((item, not_an_object(item)))
            continue
        try:
            event = ClaimEvent.model_validate(item)
        except ValidationError as exc:
            bad.append((item, describe(exc)))
            continue
        good.append((event, event.content_hash(), i))
    return good, bad


def whole(raw: Sequence[Any]) -> list[ClaimEvent] | None:
    """The batch's events, validated in one call (:data:`models.events.EVENT_BATCH`); None if
    an item is invalid (or not an object). ``publish``'s JSON text is validated as it is
    (:class:`worker.ingest.wire.Text`): pydantic-core parses it as it validates, and gives the
    same events as the parsed items would (tests/unit/test_ingest_validate.py), or refuses it,
    and the items decide."""
    events: list[ClaimEvent] | None = None
    try:
        if isinstance(raw, wire.Text) and not raw.parsed:
            events = EVENT_BATCH.validate_json(raw.text)
        elif all(isinstance(item, dict) for item in raw):
            events = EVENT_BATCH.validate_python(raw)
    except ValidationError:
        pass
    return events


def not_an_object(item: Any) -> str:
    """The reason for an item that is not a JSON object (a text line is checked as JSON)."""
    if isinstance(item, str):
        try:
            json.loads(item)
        except ValueError as exc:
            return f"event: invalid JSON ({exc})"
    return f"event: must be a JSON object, got {type(item).__name__}"


def ingest(session: Session, raw: Sequence[Any], now: datetime | None = None) -> IngestCounts:
    """Record one batch of raw events; invalid ones become dead letters. Caller commits.

    Each event received is recorded once, with the claim version it carries, under this
    message's batch; the fold (worker/store/fold.py) applies the batch once it is committed. On
    SQLite the fold runs here, in the same transaction (one writer at a time: nothing to wait
    for), so ``applied`` and ``stale`` are counted at once; on Postgres they are counted by the
    fold, and ``recorded`` says how many versions wait for it.
    """
    started, now = time.perf_counter(), now or utcnow()
    good, bad = validate(raw)
    result = IngestCounts(received=len(good) + len(bad), invalid=len(bad))
    batch_id = open_batch(session, now)
    plan = record(session, good, batch_id, now)
    if plan.conflicts:  # dead-lettered as sent (a text batch is parsed for them only)
        position = {id(e): i for e, _, i in good}
        bad += [(raw[position[id(event)]], reason) for event, reason in plan.conflicts]
    for item, reason in bad:
        dead_letter(session, "ingest", item, reason, now)
    result.duplicate, result.conflict = plan.duplicates, len(plan.conflicts)
    result.recorded = plan.to_fold
    result.reasons = [r for _, r in bad]
    close_batch(session, batch_id, result, now, started, folded=not plan.to_fold)
    if plan.to_fold and not is_postgres(session):
        folded = fold_batches(session, [batch_id])
        result.applied, result.stale, result.recorded = folded.applied, folded.stale, 0
    return result


@dataclass
class Plan:
    """What becomes of a batch's valid events, decided in batch order as
    :func:`models.ledger.decide` says: ``received`` are recorded (``True``: a version for the
    fold; ``False``: one more event id for a version already received, recorded only so a
    redelivery of that id is known), ``duplicates`` counted, ``conflicts`` refused."""

    received: list[tuple[ClaimEvent, str, bool]] = field(default_factory=list)
    duplicates: int = 0
    conflicts: list[tuple[ClaimEvent, str]] = field(default_factory=list)
    repeats: bool = False  # the batch names one event id, or one version, twice

    @property
    def to_fold(self) -> int:
        return sum(1 for *_, fold in self.received if fold)


def classify(good: Valid, by_event: dict[str, str], by_version: dict[tuple[str, int], str]) -> Plan:
    """The batch's events in order against the content hashes stored for their event ids and
    versions (``by_event``, ``by_version``), and against each other."""
    seen_events, seen_versions = dict(by_event), dict(by_version)
    plan = Plan()
    for event, content_hash, _ in good:
        version = (event.claim_id, event.version)
        same_event, same_version = seen_events.get(event.event_id), seen_versions.get(version)
        if same_event is not None or same_version is not None:
            plan.repeats = True
        outcome = decide(
            event, content_hash, same_event=same_event, same_version=same_version, current=None
        )
        if outcome.kind is Kind.CONFLICT:
            plan.conflicts.append((event, outcome.reason))
            continue
        if outcome.kind is Kind.DUPLICATE:
            plan.duplicates += 1
        if same_event is None:
            seen_events[event.event_id] = content_hash
            seen_versions.setdefault(version, content_hash)
            plan.received.append((event, content_hash, same_version is None))
    return plan


ROUNDS: Final = 8
"""Rounds of :func:`record` at most: each one finds rows committed by concurrent batches on
other claims meanwhile (an event id reused across claims), which takes a rare race per round."""


def record(session: Session, good: Valid, batch_id: int, now: datetime) -> Plan:
    """Record the batch's received events; the plan they were decided by comes back.

    Postgres, optimistic: the batch is decided as if nothing were stored and inserted with
    ``ON CONFLICT DO NOTHING``, which skips a row whose event id, or whose version, a row holds
    already. The insert waits on the unique index while a concurrent transaction holds an
    uncommitted row of the same id or version, and skips it once that commits. When every row
    went in and the batch names nothing twice, that was exact (the common case: one
    statement). Otherwise the stored hashes of the batch's ids and claims are read and the batch
    decided again, and what is now received but not yet inserted is inserted, until a round
    inserts all it meant to; a row an earlier round inserted that the batch, decided again, no
    longer records as it was inserted is taken out first (:func:`undo`). SQLite reads first (it
    is the only writer), so its first round is exact.

    Rows go in in event id order, so two batches sharing only event ids wait in one direction.
    Two that share versions under other event ids, in crossed orders, can wait on each other:
    Postgres then ends one of them (``DeadlockDetected``, after ``deadlock_timeout``), its
    transaction rolls back whole and runs again (:func:`worker.db.in_transaction`), and finds
    the other's rows committed.
    """
    postgres = is_postgres(session)
    if postgres:
        session.execute(BY_INDEX)  # the insert and lookups below: by index, whatever statistics
    # Event id -> inserted as a version for the fold (True: a new version, so no other row
    # holds its id or its version).
    inserted: dict[str, bool] = {}
    looked = not postgres
    by_event, by_version = ({}, {}) if postgres else look_up(session, good, set())
    for _ in range(ROUNDS):
        plan = classify(good, by_event, by_version)
        undo(session, inserted, plan)
        wanted = [r for r in plan.received if r[0].event_id not in inserted]
        made = insert_versions(session, wanted, batch_id, now)
        inserted |= {e.event_id: fold for e, _, fold in wanted if e.event_id in made}
        if len(made) == len(wanted) and (looked or not plan.repeats):
            return plan
        # Only the events whose id or version may be stored are looked up: a redelivered
        # batch's, or the few a batch repeats (a batch of 500 read all 500 for one repeat).
        unsure = [g for g in good if not inserted.get(g[0].event_id)]
        by_event, by_version = look_up(session, unsure, set(inserted))
        looked = True
    raise RuntimeError(f"ingest: the batch's events were still contended after {ROUNDS} rounds")


def undo(session: Session, inserted: dict[str, bool], plan: Plan) -> None:
    """Delete the rows this transaction inserted that ``plan`` does not record as they were
    inserted, and forget them as inserted (the round then inserts them again, if received).

    An earlier round decided with less of the store in view. One more event id for a version
    (inserted with no batch) can turn out to be the version itself: the event before it in the
    batch, the one it repeated, reuses an event id the store holds for other content, so that
    one is a conflict. Left with no batch, that version was never folded (its money lost, and
    every redelivery of it a duplicate). Or the extra id turns out a conflict itself, and was
    both dead-lettered and recorded."""
    wanted = {e.event_id: fold for e, _, fold in plan.received}
    stray = sorted(eid for eid, fold in inserted.items() if wanted.get(eid) != fold)
    if stray:
        session.execute(delete(T_EVENT).where(T_EVENT.c.event_id.in_(stray)))
        for eid in stray:
            del inserted[eid]


def look_up(
    session: Session, good: Valid, mine: set[str]
) -> tuple[dict[str, str], dict[tuple[str, int], str]]:
    """Content hashes stored for the batch's event ids and for its claims' versions, less the
    rows this transaction inserted itself."""
    event_ids = sorted({e.event_id for e, _, _ in good})
    claim_ids = sorted({e.claim_id for e, _, _ in good})
    return load_seen(session, event_ids, claim_ids, mine)


def load_seen(
    session: Session, event_ids: list[str], claim_ids: list[str], mine: set[str]
) -> tuple[dict[str, str], dict[tuple[str, int], str]]:
    """Content hashes already recorded by earlier batches, by event_id and by (claim_id,
    version): one query, none when both lists are empty. Rows this batch inserted itself
    (``mine``) are not "already seen". A version's hash is its holder's (the row with a batch:
    a second event id of it has the same hash, or it would be a conflict and not stored)."""
    by_event: dict[str, str] = {}
    by_version: dict[tuple[str, int], str] = {}
    if not event_ids and not claim_ids:
        return by_event, by_version
    cols = (T_EVENT.c.event_id, T_EVENT.c.claim_id, T_EVENT.c.version, T_EVENT.c.content_hash)
    tagged = [literal(True).label("by_id"), *cols]
    same_event = rows_where_in(session, tagged, T_EVENT.c.event_id, event_ids)
    tagged[0] = literal(False).label("by_id")
    same_claim = rows_where_in(session, tagged, T_EVENT.c.claim_id, claim_ids, HOLDS_A_VERSION)
    for by_id, eid, cid, version, h in session.execute(union_all(same_event, same_claim)):
        if eid in mine:
            continue
        if by_id:
            by_event[eid] = h
        else:
            by_version.setdefault((cid, version), h)
    return by_event, by_version


def version_row(event: ClaimEvent, content_hash: str) -> dict[str, Any]:
    """An event's ``received_event`` row: the version it carries (cents sparse: a missing
    amount is 0). The key is stored in canonical form, a reversal's too."""
    row: dict[str, Any] = {
        "event_id": event.event_id,
        "claim_id": event.claim_id,
        "version": event.version,
        "content_hash": content_hash,
        "status": event.status,
        "network": event.network,
        "member_seq": event.member_seq,
        "service_date": event.service_date,
        "adjudicated_at": event.adjudicated_at,
    }
    row.update(zip(KEY_COLS, event.key, strict=True))
    for amount, value in event.amounts.__dict__.items():
        if value:
            row[CENTS_OF[amount]] = int(value * 100)
    return row


VERSION_COLUMNS: Final = tuple(
    c.name for c in T_EVENT.c if c.name not in ("received_at", "batch_id")
)
"""A version row as written (``received_at`` and ``batch_id`` are the same for the whole batch)."""


def insert_versions(
    session: Session, wanted: list[tuple[ClaimEvent, str, bool]], batch_id: int, now: datetime
) -> set[str]:
    """Insert the ``wanted`` rows (in event_id order); the event ids inserted come back.

    A version for the fold is inserted under ``batch_id`` and, on Postgres, only if no row holds
    its (claim_id, version) yet (the index decides); one more event id for a version is inserted
    with no batch."""
    if not wanted:
        return set()
    fold = [version_row(e, h) for e, h, f in wanted if f]
    extra = [version_row(e, h) for e, h, f in wanted if not f]
    made: set[str] = set()
    if fold and is_postgres(session):
        params = {"rows": as_json(fold), "batch_id": batch_id, "received_at": now}
        made |= {r[0] for r in session.execute(NEW_VERSIONS(), params)}
    elif fold:
        made |= recorded(session, fold, batch_id, now)
    return made | recorded(session, extra, None, now)


def recorded(
    session: Session, rows: list[dict[str, Any]], batch_id: int | None, now: datetime
) -> set[str]:
    """Insert ``rows`` unless their event id is stored; the ids inserted."""
    made = upsert(
        session,
        T_EVENT,
        rows,
        conflict=["event_id"],
        order_by=["event_id"],
        columns=VERSION_COLUMNS,
        fill=dict.fromkeys(CLAIM_CENTS, 0),
        same={"received_at": now, "batch_id": batch_id},
        returning=["event_id"],
    )
    return {row["event_id"] for row in made}


@lru_cache(maxsize=1)
def NEW_VERSIONS() -> Executable:
    """``INSERT INTO received_event ... SELECT`` the bound rows, in event_id order, ``ON
    CONFLICT DO NOTHING RETURNING event_id``: no conflict target, so a row is skipped for its
    event id (the primary key) or its version (``ux_received_event_version``) alike."""
    rows = recordset(T_EVENT)
    values = filled(rows, T_EVENT, VERSION_COLUMNS, dict.fromkeys(CLAIM_CENTS, 0))
    values += [
        bindparam("batch_id", type_=T_EVENT.c.batch_id.type),
        bindparam("received_at", type_=T_EVENT.c.received_at.type),
    ]
    query = select(*values).order_by(rows.c.event_id)
    stmt = postgresql.insert(T_EVENT).from_select(
        [*VERSION_COLUMNS, "batch_id", "received_at"], query
    )
    return stmt.on_conflict_do_nothing().returning(T_EVENT.c.event_id)


def open_batch(session: Session, now: datetime) -> int:
    """The message's ``ingest_batch`` row, made first: its versions name it. Its counts are
    written by :func:`close_batch` (and applied/stale by the fold)."""
    stmt = insert(session, T_BATCH).values(at=now).returning(T_BATCH.c.id)
    return int(session.execute(stmt).scalar_one())


def close_batch(
    session: Session,
    batch_id: int,
    result: IngestCounts,
    now: datetime,
    started: float,
    *,
    folded: bool,
) -> None:
    """The batch's outcome counts, in its row and in the counters (same transaction); a batch
    with no version for the fold is folded already."""
    row: dict[str, Any] = dict(result.summary())
    row["duration_ms"] = int((time.perf_counter() - started) * 1000)
    if folded:
        row["folded_at"] = now
    session.execute(update(T_BATCH).where(T_BATCH.c.id == batch_id).values(row))
    counters.add(session, {f"events.{k}": n for k, n in result.summary().items()})


def refuse(session: Session, item: Any, reason: str, now: datetime | None = None) -> IngestCounts:
    """Dead-letter one raw event the store refused, and count it as an invalid event."""
    started, now = time.perf_counter(), now or utcnow()
    dead_letter(session, "ingest", item, reason, now)
    result = IngestCounts(received=1, invalid=1, reasons=[reason])
    record_batch(session, result, now, started)
    return result


def record_batch(session: Session, result: IngestCounts, now: datetime, started: float) -> None:
    """The audit row of a batch with nothing to fold, and its outcomes added to the counters
    (same transaction)."""
    close_batch(session, open_batch(session, now), result, now, started, folded=True)
