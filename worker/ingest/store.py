"""The store's operations on the ledger: ingest a batch of raw events in one transaction.

Zulip's ``consume_batch`` shape: validate and dedupe in memory, lock the batch's claims in a
stable order, fold the events with the pure ledger law, then write everything back with a few
bulk statements. Two workers on overlapping claims serialize on the claims' locks and take every
other row lock in sorted order, so they neither lose an update nor deadlock (a deadlock that
still happens is retried by ``db.in_transaction``).

Batches on different claims run side by side, so the one thing they can share, an event id
reused on another claim, is claimed before anything is decided: the batch inserts its event ids
first (``claim_event_ids``), which waits on the unique index for any concurrent batch holding
the same id, and only then reads what was already received.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Final

from pydantic import TypeAdapter, ValidationError
from sqlalchemy import delete, func, literal, text, union_all, update
from sqlmodel import Session

from models.buckets import COLUMNS
from models.events import AccumKey, ClaimEvent, describe
from models.ledger import ClaimState, Fold, Kind
from models.tables import (
    CLAIM_CENTS,
)
from worker.db import insert, is_postgres, utcnow
from worker.store import counters
from worker.store.bulk import rows_where_in, upsert
from worker.store.dead_letters import dead_letter
from worker.store.tables import (
    CENTS_OF,
    KEY_COLS,
    T_ACCUM,
    T_BATCH,
    T_CLAIM,
    T_EVENT,
    T_PAIR,
    claim_state,
)

CLAIM_COLUMNS = tuple(c.name for c in T_CLAIM.c)
"""A claim row as written: every column (the amounts sparse, a missing one is 0)."""
ACCUM_COLUMNS = (*KEY_COLS, "pair_id", *COLUMNS)
"""An accumulator delta row as written (the cents sparse, a missing one is 0)."""


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

    def merged(self, other: IngestCounts) -> IngestCounts:
        """The outcome of two parts of one message, summed."""
        counts = {k: v + getattr(other, k) for k, v in self.summary().items()}
        return IngestCounts(**counts, reasons=self.reasons + other.reasons)

    def summary(self) -> dict[str, int]:
        """Every outcome's count, in the vocabulary's order."""
        return {kind.value: getattr(self, kind.value) for kind in Kind}


Valid = list[tuple[ClaimEvent, str, dict[str, Any]]]
Rejects = list[tuple[Any, str]]


EVENTS: Final = TypeAdapter(list[ClaimEvent])
"""A whole batch validated in one call into pydantic-core (a call per event cost ~4 us more)."""


def validate(raw: Sequence[Any]) -> tuple[Valid, Rejects]:
    """Split raw items into (event, content hash, raw) triples and (raw item, reason) rejects.

    The batch is validated in one call; a batch with an invalid item is validated item by item
    instead, so each reject gets its own reason and the rest of the batch goes on."""
    if all(isinstance(item, dict) for item in raw):
        try:
            events = EVENTS.validate_python(raw)
        except ValidationError:
            pass
        else:
            return [(e, e.content_hash(), item) for e, item in zip(events, raw, strict=True)], []
    good: Valid = []
    bad: Rejects = []
    for item in raw:
        if not isinstance(item, dict):
            bad.append((item, not_an_object(item)))
            continue
        try:
            event = ClaimEvent.model_validate(item)
        except ValidationError as exc:
            bad.append((item, describe(exc)))
            continue
        good.append((event, event.content_hash(), item))
    return good, bad


def not_an_object(item: Any) -> str:
    """The reason for an item that is not a JSON object (a text line is checked as JSON)."""
    if isinstance(item, str):
        try:
            json.loads(item)
        except ValueError as exc:
            return f"event: invalid JSON ({exc})"
    return f"event: must be a JSON object, got {type(item).__name__}"


def ingest(session: Session, raw: Sequence[Any], now: datetime | None = None) -> IngestCounts:
    """Apply one batch of raw events; invalid ones become dead letters. Caller commits."""
    started, now = time.perf_counter(), now or utcnow()
    good, bad = validate(raw)
    result = IngestCounts(received=len(raw), invalid=len(bad))
    claim_ids = sorted({e.claim_id for e, _, _ in good})
    current = lock_claims(session, claim_ids)
    firsts = first_of_each_id(good)
    mine = claim_event_ids(session, firsts, now)
    seen_events, seen_versions = load_seen(
        session, [i for i in firsts if i not in mine], sorted(current), mine
    )
    fold = Fold(seen_events, seen_versions, current).apply((e, h) for e, h, _ in good)
    settle_received(session, {e.event_id: (e, h) for e, h in fold.received}, firsts, mine)
    write_claims(session, {(e.claim_id, h): e for e, h, _ in good}, fold.states)
    write_deltas(session, fold.nonzero_deltas(), now)
    raw_of = {id(e): item for e, _, item in good}
    for event, reason in fold.conflicts:
        bad.append((raw_of[id(event)], reason))
    for item, reason in bad:
        dead_letter(session, "ingest", item, reason, now)
    for kind in (Kind.APPLIED, Kind.DUPLICATE, Kind.STALE, Kind.CONFLICT):
        setattr(result, kind.value, fold.counts[kind])
    result.reasons = [r for _, r in bad]
    record_batch(session, result, now, started)
    return result


def lock_claims(session: Session, claim_ids: list[str]) -> dict[str, ClaimState]:
    """Take every claim of the batch for this transaction, then return their current states.

    Postgres: a transaction-scoped advisory lock per claim (``CLAIM_LOCKS``), taken in the
    order of the lock keys, so two batches on overlapping claims queue behind each other and
    never wait on each other in a circle. The lock holds a claim that has no row yet as well as
    one that has, and writes nothing: the claim's row is written once, by ``write_claims`` (an
    upsert that locked by rewriting the row unchanged made two row versions of each claim per
    batch). A worker of a release before this lock can't ingest beside it: its lock wrote a
    placeholder version, which the store refuses since migration 0013. SQLite: the transaction
    began with ``BEGIN IMMEDIATE``, so it is the only writer already. The states are read after
    the locks, so they include whatever a batch that held one of them committed.
    """
    if is_postgres(session):
        session.execute(CLAIM_LOCKS, {"ids": json.dumps(claim_ids)})
    query = rows_where_in(session, STATE_COLUMNS, T_CLAIM.c.claim_id, claim_ids)
    rows = session.execute(query).mappings()
    return {row["claim_id"]: claim_state(row) for row in rows if row["version"] >= 0}


STATE_COLUMNS: Final = [
    T_CLAIM.c[name]
    for name in ("claim_id", "version", "content_hash", *KEY_COLS, "network", *CENTS_OF.values())
]
"""What ``claim_state`` reads of a claim row (its dates and member_seq are stored, not read)."""

CLAIM_LOCK_SPACE: Final = 0x41430001
"""The first key of every claim's advisory lock: the two-key form's locks are a space apart
from the one-key form's, and this key keeps them apart from any other user of the two-key
form."""

CLAIM_LOCKS: Final = text(
    "SELECT count(pg_advisory_xact_lock(:space, k)) FROM "
    "(SELECT DISTINCT hashtext(v) AS k FROM json_array_elements_text(CAST(:ids AS json)) AS v "
    "ORDER BY k) AS keys"
).bindparams(space=CLAIM_LOCK_SPACE)
"""Lock each claim id, in the order of the lock keys (two ids with one hash share a lock:
a batch then waits a little longer, never forever)."""


def first_of_each_id(good: Valid) -> dict[str, tuple[ClaimEvent, str]]:
    """The first (event, content hash) of each event id in the batch, in event_id order."""
    firsts: dict[str, tuple[ClaimEvent, str]] = {}
    for event, content_hash, _ in good:
        firsts.setdefault(event.event_id, (event, content_hash))
    return dict(sorted(firsts.items()))


def claim_event_ids(
    session: Session, firsts: dict[str, tuple[ClaimEvent, str]], now: datetime
) -> set[str]:
    """Record the batch's event ids not yet received (in event_id order); the ids this
    transaction inserted come back.

    The insert waits on the unique index while a concurrent transaction holds an uncommitted
    row for the same id, and skips it once that commits: a snapshot read instead let two
    batches on different claims both apply one event id (and drop one of the two rows).
    """
    rows = [_received_row(e, h) for e, h in firsts.values()]
    made = upsert(
        session,
        T_EVENT,
        rows,
        conflict=["event_id"],
        order_by=["event_id"],
        same={"received_at": now},
        returning=["event_id"],
    )
    return {row["event_id"] for row in made}


def _received_row(event: ClaimEvent, content_hash: str) -> dict[str, Any]:
    return {
        "event_id": event.event_id,
        "claim_id": event.claim_id,
        "version": event.version,
        "content_hash": content_hash,
    }


def load_seen(
    session: Session, event_ids: list[str], claim_ids: list[str], mine: set[str]
) -> tuple[dict[str, str], dict[tuple[str, int], str]]:
    """Content hashes already recorded by earlier batches, by event_id and by (claim_id,
    version): one query, none when both lists are empty.

    ``event_ids`` are the batch's ids that ``claim_event_ids`` found already received (the
    others are new: nothing to look up). ``claim_ids`` are the batch's claims that already have
    a state: a claim without one has no received event, since the first event received for a
    claim is always applied, and a conflict is never recorded. Rows this batch inserted itself
    (``mine``) are not "already seen".
    """
    by_event: dict[str, str] = {}
    by_version: dict[tuple[str, int], str] = {}
    if not event_ids and not claim_ids:
        return by_event, by_version
    cols = (T_EVENT.c.event_id, T_EVENT.c.claim_id, T_EVENT.c.version, T_EVENT.c.content_hash)
    tagged = [literal(True).label("by_id"), *cols]
    same_event = rows_where_in(session, tagged, T_EVENT.c.event_id, event_ids)
    tagged[0] = literal(False).label("by_id")
    same_claim = rows_where_in(session, tagged, T_EVENT.c.claim_id, claim_ids)
    for by_id, eid, cid, version, h in session.execute(union_all(same_event, same_claim)):
        if eid in mine:
            continue
        if by_id:
            by_event[eid] = h
        else:
            by_version.setdefault((cid, version), h)
    return by_event, by_version


def settle_received(
    session: Session,
    received: dict[str, tuple[ClaimEvent, str]],
    firsts: dict[str, tuple[ClaimEvent, str]],
    mine: set[str],
) -> None:
    """Make the rows this batch inserted say what the fold received: drop the ids it refused
    (a conflict), rewrite the few whose received event is not the id's first in the batch."""
    refused = sorted(mine - set(received))
    if refused:
        session.execute(delete(T_EVENT).where(T_EVENT.c.event_id.in_(refused)))
    for event_id, (event, content_hash) in received.items():
        if firsts[event_id][1] != content_hash:
            row = _received_row(event, content_hash)
            session.execute(update(T_EVENT).where(T_EVENT.c.event_id == event_id).values(row))


def write_claims(
    session: Session, events: dict[tuple[str, str], ClaimEvent], states: dict[str, ClaimState]
) -> None:
    """Store each changed claim's new highest version, its details and its contribution."""
    rows = []
    for claim_id, state in sorted(states.items()):
        event = events[(claim_id, state.content_hash)]
        row: dict[str, Any] = {
            "claim_id": claim_id,
            "version": state.version,
            "content_hash": state.content_hash,
            "network": state.network,
            "member_seq": event.member_seq,
            "service_date": event.service_date,
            "adjudicated_at": event.adjudicated_at,
        }
        row.update(zip(KEY_COLS, state.key or (None,) * 5, strict=True))
        row.update({CENTS_OF[a]: v for a, v in state.cents})  # nonzero only; the rest fill 0
        rows.append(row)
    upsert(
        session,
        T_CLAIM,
        rows,
        conflict=["claim_id"],
        set_=replace_claim,
        columns=CLAIM_COLUMNS,
        fill=dict.fromkeys(CLAIM_CENTS, 0),
    )


def replace_claim(_: Any, new: Any) -> dict[str, Any]:
    """A claim's upsert: every column takes the new row's value."""
    return {c.name: new[c.name] for c in T_CLAIM.c if c.name != "claim_id"}


def pair_ids(session: Session, pairs: list[tuple[str, str]]) -> dict[tuple[str, str], int]:
    """The id of each (subscriber, group) pair, creating the missing ones (sorted: lock order)."""
    ids = existing_pairs(session, set(pairs))
    missing = [{"subscriber_id": s, "group_id": g} for s, g in pairs if (s, g) not in ids]
    if missing:
        made = upsert(
            session,
            T_PAIR,
            missing,
            conflict=["subscriber_id", "group_id"],
            returning=["id", "subscriber_id", "group_id"],
        )
        ids.update({(r["subscriber_id"], r["group_id"]): r["id"] for r in made})
    if len(ids) < len(pairs):  # another batch created some of them meanwhile
        ids.update(existing_pairs(session, {p for p in pairs if p not in ids}))
    return ids


def existing_pairs(session: Session, wanted: set[tuple[str, str]]) -> dict[tuple[str, str], int]:
    """The ids of the ``wanted`` pairs that exist, looked up by subscriber_id.

    subscriber_id leads the unique index, so ``IN`` on it is an index scan; a row-value
    ``(subscriber_id, group_id) IN (...)`` list made Postgres scan the whole table per batch.
    """
    cols = (T_PAIR.c.id, T_PAIR.c.subscriber_id, T_PAIR.c.group_id)
    query = rows_where_in(session, cols, T_PAIR.c.subscriber_id, {s for s, _ in wanted})
    return {(s, g): i for i, s, g in session.execute(query) if (s, g) in wanted}


def write_deltas(session: Session, deltas: dict[AccumKey, dict[str, int]], now: datetime) -> None:
    """Add each key's column deltas to its accumulator row and mark it dirty (in key order)."""
    if not deltas:
        return
    pairs = pair_ids(session, sorted({(k[0], k[1]) for k in deltas}))
    rows = []
    for key, delta in deltas.items():
        row: dict[str, Any] = dict(zip(KEY_COLS, key, strict=True))
        row["pair_id"] = pairs[(key[0], key[1])]
        row.update(delta)  # nonzero columns only; the rest fill 0
        rows.append(row)
    upsert(
        session,
        T_ACCUM,
        rows,
        conflict=KEY_COLS,
        set_=add_delta,
        order_by=KEY_COLS,
        columns=ACCUM_COLUMNS,
        fill=dict.fromkeys(COLUMNS, 0),
        same={"change_seq": 1, "dirty_since": now, "updated_at": now},
    )


def add_delta(acc: Any, new: Any) -> dict[str, Any]:
    """An accumulator's upsert: add the delta row to the stored row and keep it dirty."""
    changes: dict[str, Any] = {c: acc[c] + new[c] for c in COLUMNS}
    changes["change_seq"] = acc.change_seq + 1
    changes["dirty_since"] = func.coalesce(acc.dirty_since, new.dirty_since)
    changes["updated_at"] = new.updated_at
    return changes


def refuse(session: Session, item: Any, reason: str, now: datetime | None = None) -> IngestCounts:
    """Dead-letter one raw event the store refused, and count it as an invalid event."""
    started, now = time.perf_counter(), now or utcnow()
    dead_letter(session, "ingest", item, reason, now)
    result = IngestCounts(received=1, invalid=1, reasons=[reason])
    record_batch(session, result, now, started)
    return result


def record_batch(session: Session, result: IngestCounts, now: datetime, started: float) -> None:
    """The batch's audit row, and its outcomes added to the counters (same transaction)."""
    row = result.summary() | {"at": now}
    row["duration_ms"] = int((time.perf_counter() - started) * 1000)
    session.execute(insert(session, T_BATCH).values(row))
    counters.add(session, {f"events.{k}": n for k, n in result.summary().items()})
