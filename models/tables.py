"""The SQL store's tables (SQLModel). Money is integer cents: exact on SQLite and Postgres alike.

- ``ReceivedEvent``: every event accepted once (dedup by event_id, conflict check by content hash),
  with the claim version it carries, for the fold.
- ``Claim``: each claim's highest version and what it contributes.
- ``Pair``: one (subscriber, group), the unit a flush works on, with its retry schedule and lease.
- ``Accumulator``: one VBA SubscriberAccum key: ``ours`` (30 columns), ``pushed_*`` (our share as
  VBA last confirmed it), a change counter and ``dirty_since``.
- ``DeadLetter``: anything refused, with its reason and raw payload; nothing is dropped silently.
- ``IngestBatch``: one row per ingested message with its outcome counts (status reads these), and
  when its versions were folded.
- ``FlushAttempt``: one row per batch call to VBA, for audit (items, statuses, activityId).
- ``PlanPush``: the content hash of each plan's accumulator definitions as last accepted by VBA.
- ``EventCounter``: durable counts of events of note (token refreshes, 429s) for ``metrics``.
- ``BeatTick``: each celery beat's first and last scheduled flush, so ``health`` sees beat.
- ``SharedState``: the rate-limit bucket and the VBA token, shared through the store without Redis.
"""

from __future__ import annotations

from datetime import date, datetime
from typing import Any

from sqlalchemy import BigInteger, Column, Index, Integer, String, Text, UniqueConstraint, text
from sqlmodel import Field, SQLModel

from models.buckets import AMOUNTS, COLUMNS

PUSHED: tuple[str, ...] = tuple(f"pushed_{c}" for c in COLUMNS)
"""The ``pushed_*`` twin of each of the 30 columns."""

CLAIM_CENTS: tuple[str, ...] = tuple(f"{a}_cents" for a in AMOUNTS)
"""A claim's ten amounts, in cents."""


BIGINT_ID = BigInteger().with_variant(Integer(), "sqlite")
"""A 64-bit id; on SQLite plain INTEGER, which is 64-bit there and keeps the rowid alias."""


def ident(length: int, **field: Any) -> Any:
    """An id or key field of ``length`` characters (event, claim, subscriber, group, plan year
    and type, benefit code): on Postgres ``COLLATE "C"``, compared and sorted byte by byte
    (migration 0016).

    These columns are only matched, grouped and ordered for locks, never shown in a language's
    order, and keys are canonical ASCII. Under the database's collation every comparison in
    their indexes, the fold's sorts and its joins called the C library's ``strcoll``; byte
    order takes no call (bench/README.md, finding 22). SQLite compares bytes already."""
    column = String(length).with_variant(String(length, collation="C"), "postgresql")
    return Field(max_length=length, sa_type=column, **field)


def _cents_columns(names: tuple[str, ...], ns: dict[str, Any]) -> None:
    """Declare one NOT NULL BIGINT (cents) field per name in a class body namespace."""
    annotations = ns.setdefault("__annotations__", {})
    for name in names:
        annotations[name] = int
        ns[name] = Field(default=0, sa_column_kwargs={"server_default": "0"}, sa_type=BigInteger)


class VersionColumns(SQLModel):
    """What a claim version carries, and a claim's state keeps of its highest one: the key, the
    network, the details stored, the ten amounts in cents (a reversed claim's state: no key)."""

    subscriber_id: str | None = ident(9, default=None)
    group_id: str | None = ident(20, default=None)
    plan_year: str | None = ident(8, default=None)
    plan_type: str | None = ident(6, default=None)
    benefit_code: str | None = ident(10, default=None)
    network: str | None = Field(default=None, max_length=3)
    member_seq: str | None = Field(default=None, max_length=2)
    service_date: date | None = None
    adjudicated_at: datetime | None = None
    _cents_columns(CLAIM_CENTS, locals())


HOLDS_A_VERSION = text("batch_id IS NOT NULL")


class ReceivedEvent(VersionColumns, table=True):
    """One event received: the idempotency record and, since 0014, the claim version it carries.

    Ingest only records (one row per event); the fold (worker/store/fold.py) turns the versions
    of committed batches into claim states and totals. ``batch_id`` names the ``ingest_batch``
    whose fold applies this version; it is NULL for a second event id of a version already
    received, which has nothing to fold. So one row with a batch holds each version, and
    ``ux_received_event_version`` says so: two batches inserting one version at once meet on it
    (migration 0017, which gave the rows received before 0014 a batch, folded already).
    """

    __tablename__ = "received_event"
    __table_args__ = (
        Index(
            "ux_received_event_version",
            "claim_id",
            "version",
            unique=True,
            postgresql_where=HOLDS_A_VERSION,
            sqlite_where=HOLDS_A_VERSION,
        ),
        Index("ix_received_event_batch", "batch_id"),
    )

    event_id: str = ident(128, primary_key=True)
    claim_id: str = ident(64)
    version: int
    content_hash: str = Field(max_length=64)
    received_at: datetime
    batch_id: int | None = Field(default=None, sa_type=BIGINT_ID)
    status: str | None = Field(default=None, max_length=11, description="adjudicated|reversed")


class Claim(VersionColumns, table=True):
    __tablename__ = "claim"

    claim_id: str = ident(64, primary_key=True)
    version: int = Field(default=-1, description="-1: nothing applied (older lock placeholders)")
    content_hash: str = Field(default="", max_length=64)


class Pair(SQLModel, table=True):
    __tablename__ = "pair"
    __table_args__ = (UniqueConstraint("subscriber_id", "group_id", name="uq_pair"),)

    id: int | None = Field(default=None, primary_key=True)
    subscriber_id: str = ident(9)
    group_id: str = ident(20)
    next_attempt_at: datetime | None = Field(default=None, index=True)
    attempts: int = 0
    lease_owner: str | None = Field(default=None, max_length=64)
    lease_until: datetime | None = Field(default=None, description="by the database's clock")
    lease_gen: int = Field(
        default=0,
        sa_type=BigInteger,
        sa_column_kwargs={"server_default": "0"},
        description="bumped by every lease taken: a flush's writes are fenced on it",
    )
    queued_until: datetime | None = Field(default=None, description="a flush task is queued")
    last_error: str | None = Field(default=None, sa_type=Text)
    last_flush_at: datetime | None = None


class Accumulator(SQLModel, table=True):
    __tablename__ = "accumulator"
    __table_args__ = (
        UniqueConstraint(
            "subscriber_id", "group_id", "plan_year", "plan_type", "benefit_code", name="uq_accum"
        ),
    )

    id: int | None = Field(default=None, primary_key=True, sa_type=BIGINT_ID)
    pair_id: int = Field(foreign_key="pair.id", index=True)
    subscriber_id: str = ident(9)
    group_id: str = ident(20)
    plan_year: str = ident(8)
    plan_type: str = ident(6)
    benefit_code: str = ident(10)
    change_seq: int = Field(default=0, sa_type=BigInteger)
    pushed_seq: int = Field(
        default=0,
        sa_type=BigInteger,
        description="the version of pushed_*: every change of our confirmed share bumps it",
    )
    dirty_since: datetime | None = Field(default=None, index=True)
    updated_at: datetime | None = None
    # The flush's write-ahead intent: set before the PUT, cleared once its outcome is known.
    intent_target: str | None = Field(default=None, sa_type=Text, description="JSON cents")
    intent_ours: str | None = Field(default=None, sa_type=Text, description="JSON cents")
    intent_seq: int | None = Field(default=None, sa_type=BigInteger)
    intent_before: str | None = Field(
        default=None, sa_type=Text, description="JSON cents: VBA's row the target was computed from"
    )
    intent_at: datetime | None = Field(default=None, description="by the database's clock")
    attempts: int = 0
    next_attempt_at: datetime | None = Field(default=None, index=True)
    held: bool = Field(default=False, description="dead-lettered: not flushed until replayed")
    _cents_columns(COLUMNS, locals())
    _cents_columns(PUSHED, locals())


class DeadLetter(SQLModel, table=True):
    __tablename__ = "dead_letter"

    id: int | None = Field(default=None, primary_key=True, sa_type=BIGINT_ID)
    source: str = Field(max_length=16, description="ingest | flush | plans")
    kind: str | None = Field(
        default=None, max_length=16, description="flush: refused | held kinds (ambiguous, ...)"
    )
    fingerprint: str = Field(max_length=64, unique=True)
    reason: str = Field(sa_type=Text)
    event_id: str | None = Field(default=None, max_length=128, index=True)
    accumulator_id: int | None = Field(default=None, index=True, sa_type=BIGINT_ID)
    activity_id: str | None = Field(default=None, max_length=128)
    payload: str = Field(sa_column=Column(Text, nullable=False))
    first_seen: datetime
    last_seen: datetime
    count: int = 1
    replayed_at: datetime | None = Field(default=None, description="closed: replayed/resolved")
    resolution: str | None = Field(
        default=None, max_length=16, description="how an operator settled a hold"
    )


UNFOLDED = text("folded_at IS NULL")


class IngestBatch(SQLModel, table=True):
    __tablename__ = "ingest_batch"
    __table_args__ = (
        Index("ix_ingest_batch_unfolded", "id", postgresql_where=UNFOLDED, sqlite_where=UNFOLDED),
    )

    id: int | None = Field(default=None, primary_key=True)
    at: datetime = Field(index=True)
    # One column per ingest outcome, named as models.ledger.Kind spells it.
    received: int = 0
    applied: int = 0
    duplicate: int = 0
    stale: int = 0
    conflict: int = 0
    invalid: int = 0
    duration_ms: int = 0
    folded_at: datetime | None = Field(
        default=None, description="its versions folded into the totals (applied, stale counted)"
    )


class FlushAttempt(SQLModel, table=True):
    __tablename__ = "flush_attempt"

    id: int | None = Field(default=None, primary_key=True)
    pair_id: int | None = Field(default=None, index=True)
    plan_id: str | None = Field(default=None, max_length=64)
    started_at: datetime = Field(index=True)
    duration_ms: int = 0
    items: int = 0
    http_status: int | None = None
    statuses: str = Field(default="{}", sa_type=Text, description="JSON: item status -> count")
    outcome: str = Field(max_length=16, description="ok|partial|unavailable|rejected|recovered")
    activity_id: str | None = Field(default=None, max_length=128)
    error: str | None = Field(default=None, sa_type=Text)
    read_to_put_ms: int | None = Field(
        default=None, description="shared: from VBA's answer to our read until the PUT left"
    )


class PlanPush(SQLModel, table=True):
    """One plan's accumulator definitions as last requested, and how far VBA got with them.

    ``plans push`` requests (``pending``); the CLI, then the worker, send what is ``remaining``
    with the accumulators' backoff until VBA accepted (``sent``) or refused (``refused``) every
    record, or the attempts ran out (``failed``).
    """

    __tablename__ = "plan_push"

    plan_id: str = Field(primary_key=True, max_length=64)
    content_hash: str = Field(max_length=64)
    pushed_at: datetime | None = Field(default=None, description="last accepted in full")
    records: str = Field(default="[]", sa_type=Text, description="JSON: the requested records")
    remaining: str = Field(default="[]", sa_type=Text, description="JSON: accum_Names to send")
    status: str = Field(default="sent", max_length=16, description="pending|sent|refused|failed")
    attempts: int = 0
    next_attempt_at: datetime | None = Field(default=None, index=True)
    last_error: str | None = Field(default=None, sa_type=Text)
    claim_gen: int = Field(
        default=0,
        sa_type=BigInteger,
        sa_column_kwargs={"server_default": "0"},
        description="bumped by every claim to send: a send's bookkeeping is fenced on it",
    )
    in_flight_until: datetime | None = Field(
        default=None,
        description="a send whose outcome is unknown may still land until then: other "
        "definitions of the plan are not sent before (they would land under it)",
    )


class SharedState(SQLModel, table=True):
    """What the fleet's processes share through the store when there is no Redis (the embedded
    defaults): VBA's rate-limit bucket, the id token and its renewal lock, as JSON by name."""

    __tablename__ = "shared_state"

    name: str = Field(primary_key=True, max_length=64)
    value: str = Field(default="{}", sa_type=Text, description="JSON")
    until: datetime | None = Field(default=None, description="a lock's end (the store's clock)")


class EventCounter(SQLModel, table=True):
    """How often an event of note happened, in any process: metrics read it from here."""

    __tablename__ = "event_counter"

    name: str = Field(primary_key=True, max_length=64)
    value: int = Field(default=0, sa_type=BigInteger)
    updated_at: datetime


class BeatTick(SQLModel, table=True):
    """One celery beat process (``host:pid``): when it first and last queued a scheduled flush,
    by the database's clock. ``health`` reads it: no tick lately, or two beats at once."""

    __tablename__ = "beat_tick"

    beat: str = Field(primary_key=True, max_length=128)
    first_at: datetime
    last_at: datetime
    ticks: int = Field(default=0, sa_type=BigInteger)


class ReconcileRun(SQLModel, table=True):
    """One ``accumsync reconcile``: its scope, its cursor (pairs are checked in id order, so a
    run interrupted resumes after the last pair it finished) and its counts."""

    __tablename__ = "reconcile_run"

    id: int | None = Field(default=None, primary_key=True)
    scope: str = Field(max_length=200, description="what was asked: all, a pair, a file")
    scope_hash: str = Field(max_length=64, index=True, description="sha256 of the pair ids")
    ownership: str = Field(max_length=16)
    repair: bool = False
    started_at: datetime
    updated_at: datetime
    finished_at: datetime | None = None
    last_pair_id: int = Field(default=0, description="the cursor: every pair <= it is done")
    pairs_done: int = 0
    keys_checked: int = 0


class ReconcileFinding(SQLModel, table=True):
    """A key a reconcile run found not equal: drift, or a key it could not judge (in flight,
    held, unreadable). ``fields`` holds the amounts: member data, kept in the store only."""

    __tablename__ = "reconcile_finding"

    id: int | None = Field(default=None, primary_key=True, sa_type=BIGINT_ID)
    run_id: int = Field(foreign_key="reconcile_run.id", index=True)
    accumulator_id: int = Field(sa_type=BIGINT_ID)
    finding: str = Field(max_length=16)
    fields: str = Field(default="[]", sa_type=Text, description="JSON: the fields not as expected")
    repaired: bool = False
