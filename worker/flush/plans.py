"""``accumsync plans push``: plan accumulator definitions (seed 000) from YAML or JSON to VBA.

Each plan's records are validated against the seed's fields and hashed. A plan whose content
changed since its last settled push (or any plan, with ``--force``) is stored as a pending push
with the records that remain to send (``plan_push``); the CLI sends it at once, and what VBA
cannot take now (a 429, a 5xx, an item 5xx, no item) is retried by the worker with the
accumulators' backoff (``next_attempt_at``, swept by beat through ``accumsync.flush_due``).
207 items are read by key (plan_ID, accum_Name): a 2xx is accepted, a 4xx becomes a dead letter
with VBA's message. After ``max_attempts`` what remains becomes dead letters too, and
``dead-letters replay`` sends those records again.

A plan definition is absolute, so sending the same one again is always safe; sending newer
definitions while an older send may still land is not (the older would land last). So a send
claims the plan (``claim_gen``, with ``next_attempt_at`` as the claim's end, long enough for its
requests to land), a push of new definitions never takes a live claim over, and a send whose
outcome is unknown keeps other definitions back until it can no longer land
(``in_flight_until``). A send's bookkeeping is fenced on its claim and on the content it sent: a
send whose definitions were replaced meanwhile records nothing as sent.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError
from sqlalchemy import or_, select, update
from sqlmodel import Session

from models.events import canon
from models.sync import backoff
from models.tables import PlanPush
from models.vba import PlanAccumulator, dumps, loads
from worker.db import as_utc, clock, db_after, db_now, session_scope
from worker.logs import Log
from worker.settings import get_settings
from worker.store.dead_letters import dead_letter
from worker.store.tables import T_PLAN
from worker.vba import BatchResult, VbaClient, VbaError
from worker.vba.errors import refuses_data
from worker.vba.fleet import client

log = Log("plans")


class PlanFileError(ValueError):
    """The plans file cannot be read, or a record breaks the seed's rules."""


@dataclass
class PushReport:
    """One row per plan: (plan id, records, outcome); ``failed`` counts records refused or
    given up, ``pending`` the plans the worker will retry."""

    rows: list[tuple[str, str, str]] = field(default_factory=list)
    failed: int = 0
    pending: int = 0

    def add(self, other: PushReport) -> PushReport:
        self.rows += other.rows
        self.failed += other.failed
        self.pending += other.pending
        return self


def load_plans(path: Path) -> list[PlanAccumulator]:
    """Read and validate every record; the error names the record's index and field."""
    try:
        text = path.read_text(encoding="utf-8")
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (OSError, ValueError, yaml.YAMLError) as exc:
        raise PlanFileError(f"{path}: cannot read plans: {exc}") from None
    records = data.get("plans") if isinstance(data, dict) else data
    if not isinstance(records, list):
        raise PlanFileError(f"{path}: expected a list of plan accumulators (or {{plans: [...]}})")
    plans: list[PlanAccumulator] = []
    seen: dict[tuple[str, str], int] = {}
    for i, record in enumerate(records):
        try:
            plan = PlanAccumulator.model_validate(record)
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors(include_url=False)
            )
            raise PlanFileError(f"{path}: record {i}: {problems}") from None
        key = (canon(plan.plan_ID), canon(plan.accum_Name))
        if (first := seen.setdefault(key, i)) != i:
            raise PlanFileError(
                f"{path}: record {i}: accum_Name: plan {plan.plan_ID} already defines "
                f"{plan.accum_Name!r} (record {first}; VBA compares names without case or "
                "trailing spaces): one definition per accumulator"
            )
        plans.append(plan)
    return plans


def content_hash(records: list[PlanAccumulator]) -> str:
    body = sorted(dumps(r.to_wire()) for r in records)
    return hashlib.sha256("\n".join(body).encode()).hexdigest()


def push_plans(
    plans: list[PlanAccumulator], force: bool = False, vba: VbaClient | None = None
) -> PushReport:
    """Request each changed plan (every plan with ``force``), then send the requests now."""
    by_plan: dict[str, list[PlanAccumulator]] = defaultdict(list)
    for plan in plans:
        by_plan[plan.plan_ID].append(plan)
    report, wanted = PushReport(), []
    with session_scope() as s:
        for plan_id, records in sorted(by_plan.items()):
            if request(s, plan_id, records, force):
                wanted.append(plan_id)
            else:
                report.rows.append((plan_id, str(len(records)), "unchanged, skipped"))
    return report.add(push_due(vba, wanted)) if wanted else report


def request(session: Session, plan_id: str, records: list[PlanAccumulator], force: bool) -> bool:
    """Store the plan's records as a pending push; False when they were settled unchanged.

    A send under way (a live claim) or one that may still land keeps its time: the new
    definitions go once it is over, so they land after it, never under it."""
    digest = content_hash(records)
    row = session.get(PlanPush, plan_id)
    if row is not None and row.status == "sent" and row.content_hash == digest and not force:
        return False
    now = clock(session)
    row = row or PlanPush(plan_id=plan_id, content_hash=digest)
    changed = row.content_hash != digest
    row.content_hash, row.status, row.attempts = digest, "pending", 0
    row.records = dumps([r.to_wire() for r in records])
    row.remaining = json.dumps(sorted(r.accum_Name for r in records))
    busy = [t for t in (row.next_attempt_at, row.in_flight_until if changed else None) if t]
    row.next_attempt_at = max((as_utc(t) for t in busy if as_utc(t) > now), default=None)
    row.last_error = None
    session.add(row)
    return True


def due_count(session: Session) -> int:
    """Pending plan pushes whose time has come (beat queues ``accumsync.push_plans`` then)."""
    query = select(T_PLAN.c.plan_id).where(*_due())
    return len(session.execute(query).all())


def _due() -> tuple[Any, ...]:
    p = T_PLAN.c
    return (p.status == "pending", or_(p.next_attempt_at.is_(None), p.next_attempt_at <= db_now()))


def push_due(vba: VbaClient | None = None, plan_ids: list[str] | None = None) -> PushReport:
    """Send every due pending push (or only ``plan_ids``), one plan at a time; a plan asked
    for that is not due (another send of it is under way, or may still land) is reported as
    waiting for the worker."""
    report = PushReport()
    claimed = _claim(plan_ids)
    for plan_id, gen in claimed:
        report.add(_push_one(vba or client(), plan_id, gen))
    for plan_id in sorted(set(plan_ids or ()) - {plan_id for plan_id, _ in claimed}):
        report.pending += 1
        report.rows.append((plan_id, "", WAITING))
    return report


WAITING = "queued: an earlier send of it is under way or may still land; the worker sends it next"


def _claim(plan_ids: list[str] | None) -> list[tuple[str, int]]:
    """Take the due pushes: each one is sent by one process at a time (its claim generation)."""
    p = T_PLAN.c
    stmt = update(T_PLAN).where(*_due())
    if plan_ids is not None:
        stmt = stmt.where(p.plan_id.in_(plan_ids))
    claim = {"next_attempt_at": db_after(_claim_seconds(1)), "claim_gen": p.claim_gen + 1}
    stmt = stmt.values(claim).returning(p.plan_id, p.claim_gen)
    with session_scope() as s:
        return sorted((row.plan_id, int(row.claim_gen)) for row in s.execute(stmt))


def _claim_seconds(calls: int) -> float:
    """How long a claim to send ``calls`` requests lasts: each may take the request's worst
    case, and may land until a grace after it left (a crashed sender's claim then ends only
    once nothing it sent can land)."""
    s = get_settings()
    return calls * s.request_worst_case + s.settle_grace


@dataclass
class Attempt:
    """What one attempt at a plan's remaining records came to."""

    accepted: set[str] = field(default_factory=set)
    refused: list[tuple[PlanAccumulator, str]] = field(default_factory=list)
    retry: str | None = None
    retry_after: float | None = None
    activity_id: str | None = None
    may_still_land: bool = False
    """A request's outcome is unknown and it may still land (a timeout, a gateway's 5xx)."""


def _push_one(vba: VbaClient, plan_id: str, gen: int) -> PushReport:
    with session_scope() as s:
        row = s.get(PlanPush, plan_id)
        assert row is not None
        names, sending = set(json.loads(row.remaining)), row.content_hash
        records = [PlanAccumulator.model_validate(r) for r in loads(row.records)]
        todo = [r for r in records if r.accum_Name in names]
        calls = max(1, -(-len(todo) // get_settings().vba_batch_max))
        s.execute(_fence(plan_id, gen).values(next_attempt_at=db_after(_claim_seconds(calls))))
    attempt = _send(vba, plan_id, todo)
    with session_scope() as s:
        return _settle(s, plan_id, gen, sending, todo, attempt)


def _fence(plan_id: str, gen: int) -> Any:
    """An update of the plan's row that holds only while ``gen`` is its claim."""
    p = T_PLAN.c
    return update(T_PLAN).where(p.plan_id == plan_id, p.claim_gen == gen)


def _send(vba: VbaClient, plan_id: str, records: list[PlanAccumulator]) -> Attempt:
    """Send in chunks; stop at a whole-call failure VBA may get over."""
    attempt, size = Attempt(), get_settings().vba_batch_max
    for start in range(0, len(records), size):
        if not _put(vba, plan_id, records[start : start + size], attempt):
            break
    return attempt


def _put(vba: VbaClient, plan_id: str, records: list[PlanAccumulator], attempt: Attempt) -> bool:
    """One batch call; a whole-call refusal of the records is split in halves until the
    refused ones stand alone. False when the push must stop (VBA away, our credentials)."""
    try:
        result = vba.upsert_plan_accumulators(plan_id, records)
    except VbaError as exc:
        attempt.activity_id = exc.activity_id
        if not refuses_data(exc):
            attempt.retry = f"{type(exc).__name__}: {exc}"
            attempt.retry_after = getattr(exc, "retry_after", None)
            attempt.may_still_land |= getattr(exc, "may_still_land", False)
            return False
        if len(records) == 1:
            attempt.refused.append((records[0], f"VBA refused the record ({exc.status}): {exc}"))
            return True
        half = len(records) // 2
        return _put(vba, plan_id, records[:half], attempt) and _put(
            vba, plan_id, records[half:], attempt
        )
    _read(result, records, attempt)
    return True


def _read(result: BatchResult, chunk: list[PlanAccumulator], attempt: Attempt) -> None:
    """Each record's 207 item, found by key: accepted, refused, or to send again."""
    attempt.activity_id = result.activity_id
    for record in chunk:
        item = result.find(record.key)
        if item is not None and item.ok:
            attempt.accepted.add(record.accum_Name)
        elif item is not None and item.rejected:
            attempt.refused.append((record, f"VBA refused ({item.status}): {item.body}"))
        else:
            why = f"VBA item status {item.status}: {item.body}" if item else "no 207 item for key"
            attempt.retry = why


def _settle(
    session: Session,
    plan_id: str,
    gen: int,
    sent: str,
    todo: list[PlanAccumulator],
    attempt: Attempt,
) -> PushReport:
    """Record the attempt: what is left, the dead letters, and when to try again; nothing if
    the claim was lost, and only when the next send may go if the definitions were replaced
    meanwhile (what this send got through is no longer what was asked)."""
    now = clock(session)
    p = T_PLAN.c
    if attempt.may_still_land:
        later = now + timedelta(seconds=get_settings().settle_grace)
        held_back = or_(p.in_flight_until.is_(None), p.in_flight_until < later)
        session.execute(_fence(plan_id, gen).where(held_back).values(in_flight_until=later))
    query = select(PlanPush).where(p.plan_id == plan_id, p.claim_gen == gen)
    row = session.execute(query).scalar_one_or_none()
    if row is None:
        log.warning("plans.claim_lost", plan=plan_id)
        return PushReport(rows=[(plan_id, str(len(todo)), "claim lost: another send took it")])
    if row.content_hash != sent:
        row.next_attempt_at = row.in_flight_until if attempt.may_still_land else None
        session.add(row)
        log.info("plans.superseded", plan=plan_id)
        return PushReport(pending=1, rows=[(plan_id, str(len(todo)), SUPERSEDED)])
    for record, reason in attempt.refused:
        _dead_letter(session, record, reason, attempt.activity_id, now, "refused")
    done = attempt.accepted | {r.accum_Name for r, _ in attempt.refused}
    left = [r for r in todo if r.accum_Name not in done]
    row.remaining = json.dumps(sorted(r.accum_Name for r in left))
    report = PushReport(failed=len(attempt.refused))
    n = str(len(todo))
    if not left:
        row.status, row.attempts, row.next_attempt_at, row.last_error = "sent", 0, None, None
        row.pushed_at = now if not attempt.refused else row.pushed_at
        outcome = f"{len(attempt.refused)} refused" if attempt.refused else "sent"
        report.rows.append((plan_id, n, outcome))
    elif row.attempts + 1 >= get_settings().max_attempts:
        _give_up(session, row, left, attempt, now)
        report.failed += len(left)
        report.rows.append((plan_id, n, f"gave up: {len(left)} records are dead letters"))
    else:
        row.attempts += 1
        row.next_attempt_at = now + _backoff(row.attempts, attempt.retry_after)
        row.last_error = attempt.retry
        report.pending = 1
        report.rows.append(
            (plan_id, n, f"not accepted yet: the worker retries (attempt {row.attempts})")
        )
        log.warning(
            "plans.retry", plan=plan_id, attempt=row.attempts, activity_id=attempt.activity_id
        )
    session.add(row)
    return report


SUPERSEDED = "superseded: newer definitions were pushed meanwhile; they are sent next"


def _give_up(
    session: Session, row: PlanPush, left: list[PlanAccumulator], attempt: Attempt, now: datetime
) -> None:
    why = f"gave up after {row.attempts + 1} attempts: {attempt.retry}"
    for record in left:
        _dead_letter(session, record, why, attempt.activity_id, now, "gave_up")
    row.status, row.remaining, row.next_attempt_at = "failed", "[]", None
    row.attempts, row.last_error = row.attempts + 1, attempt.retry


def _backoff(attempt: int, retry_after: float | None) -> timedelta:
    s = get_settings()
    return timedelta(
        seconds=backoff(attempt, s.backoff_base, s.backoff_max, random.Random(), retry_after)
    )


def _dead_letter(
    session: Session,
    record: PlanAccumulator,
    reason: str,
    activity_id: str | None,
    now: datetime,
    kind: str,
) -> None:
    payload = loads(dumps(record.to_wire()))
    dead_letter(session, "plans", payload, reason, now, activity_id=activity_id, kind=kind)


def requeue(session: Session, letter_id: int, payload: str) -> str:
    """Put a dead-lettered record back into its plan's pending push; the plan's id.

    ValueError, saying why, when the plan's requested definitions no longer hold that record
    (the file changed since: pushing it again is the way)."""
    try:
        record = PlanAccumulator.model_validate(loads(payload))
    except (ValueError, ValidationError):
        raise ValueError(f"letter {letter_id}: its payload is not a plan record") from None
    row = session.get(PlanPush, record.plan_ID)
    requested = (
        [] if row is None else [PlanAccumulator.model_validate(r) for r in loads(row.records)]
    )
    if row is None or record not in requested:
        raise ValueError(
            f"letter {letter_id}: plan {record.plan_ID}'s definitions changed since; "
            "push the plans file again"
        )
    row.remaining = json.dumps(sorted(set(json.loads(row.remaining)) | {record.accum_Name}))
    row.status, row.attempts, row.next_attempt_at = "pending", 0, None
    session.add(row)
    return record.plan_ID
