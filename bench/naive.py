"""The ingest benchmark's baseline: one Celery task per event, an ORM read-modify-write each.

This is how ingest is usually written first, and what accumsync's batched ingest is measured
against. It is loaded only by the benchmark (``celery -A worker worker -I bench.naive``) and is
never part of the product. It keeps the ledger's law for the stream the benchmark sends
(duplicates, versions, reversals, key moves; conflicts are not generated there) so its totals can
be checked too, and it locks the claim and accumulator rows it changes (``FOR UPDATE``) so two
processes don't lose updates; a lost race on inserting a new row is retried.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, select

from models.buckets import AMOUNTS, COLUMNS
from models.events import ClaimEvent
from models.ledger import ClaimState
from models.tables import CLAIM_CENTS, Accumulator, Claim, Pair, ReceivedEvent
from worker.celery import app
from worker.db import in_transaction

TASK = "bench.naive_ingest"


@app.task(name=TASK, bind=True, acks_late=True, max_retries=None)
def naive_ingest(self: Any, raw: dict[str, Any]) -> str:
    """Apply one event in its own transaction."""
    try:
        return in_transaction(lambda session: apply_one(session, raw))
    except IntegrityError as exc:  # another process inserted the same new row first
        raise self.retry(exc=exc, countdown=0) from None


def apply_one(session: Session, raw: dict[str, Any]) -> str:
    event = ClaimEvent.model_validate(raw)
    digest = event.content_hash()
    if session.get(ReceivedEvent, event.event_id) is not None:
        return "duplicate"
    claim = session.get(Claim, event.claim_id, with_for_update=True)
    now = datetime.now(UTC)
    session.add(
        ReceivedEvent(
            event_id=event.event_id,
            claim_id=event.claim_id,
            version=event.version,
            content_hash=digest,
            received_at=now,
        )
    )
    if claim is not None and claim.version > event.version:
        return "stale"
    if claim is not None and claim.subscriber_id is not None:
        cents = tuple((a, getattr(claim, c)) for a, c in zip(AMOUNTS, CLAIM_CENTS, strict=True))
        old = ClaimState(claim.version, claim.content_hash, key_of(claim), claim.network, cents)
        add(session, old, -1, now)
    new = ClaimState.of(event, digest)
    add(session, new, +1, now)
    claim = claim or Claim(claim_id=event.claim_id)
    claim.version, claim.content_hash, claim.network = event.version, digest, new.network
    key = new.key or (None,) * 5
    claim.subscriber_id, claim.group_id, claim.plan_year, claim.plan_type, claim.benefit_code = key
    cents = dict(new.cents)
    for amount, col in zip(AMOUNTS, CLAIM_CENTS, strict=True):
        setattr(claim, col, cents.get(amount, 0))
    claim.member_seq, claim.service_date = event.member_seq, event.service_date
    session.add(claim)
    return "applied"


def key_of(claim: Claim) -> tuple[str, ...]:
    return (
        claim.subscriber_id,
        claim.group_id,
        claim.plan_year,
        claim.plan_type,
        claim.benefit_code,
    )


def add(session: Session, state: ClaimState, sign: int, now: datetime) -> None:
    """Read the accumulator row (creating it and its pair), add the contribution, write it."""
    if state.key is None:
        return
    sub, grp, year, ptype, code = state.key
    accum = session.exec(
        select(Accumulator)
        .where(Accumulator.subscriber_id == sub, Accumulator.group_id == grp)
        .where(Accumulator.plan_year == year, Accumulator.plan_type == ptype)
        .where(Accumulator.benefit_code == code)
        .with_for_update()
    ).first()
    if accum is None:
        pair = session.exec(
            select(Pair).where(Pair.subscriber_id == sub, Pair.group_id == grp)
        ).first()
        if pair is None:
            pair = Pair(subscriber_id=sub, group_id=grp)
            session.add(pair)
            session.flush()
        accum = Accumulator(
            pair_id=pair.id,
            subscriber_id=sub,
            group_id=grp,
            plan_year=year,
            plan_type=ptype,
            benefit_code=code,
        )
        for col in COLUMNS:
            setattr(accum, col, 0)
    for col, cents in state.contribution().items():
        setattr(accum, col, getattr(accum, col) + sign * cents)
    accum.change_seq += 1
    accum.dirty_since = accum.dirty_since or now
    accum.updated_at = now
    session.add(accum)
    session.flush()
