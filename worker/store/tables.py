"""Typed handles on the tables, taken from the metadata, and the predicates shared by every part
that asks the store the same question.

SQLModel gives each model a ``__table__`` that type checkers cannot see; the handles here are
``sqlalchemy.Table`` objects looked up by name in ``SQLModel.metadata``, so Core statements over
them type-check without an ignore.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import ColumnElement, Table, and_, or_
from sqlmodel import SQLModel

from models import tables
from models.buckets import AMOUNTS
from models.events import AccumKey
from models.ledger import ClaimState
from models.tables import CLAIM_CENTS


def table(model: type[SQLModel]) -> Table:
    """The Core table of a SQLModel table class."""
    return SQLModel.metadata.tables[str(model.__tablename__)]


T_EVENT = table(tables.ReceivedEvent)
T_CLAIM = table(tables.Claim)
T_PAIR = table(tables.Pair)
T_ACCUM = table(tables.Accumulator)
T_DEAD = table(tables.DeadLetter)
T_BATCH = table(tables.IngestBatch)
T_ATTEMPT = table(tables.FlushAttempt)
T_PLAN = table(tables.PlanPush)
T_SHARED = table(tables.SharedState)
T_COUNTER = table(tables.EventCounter)
T_BEAT = table(tables.BeatTick)
T_RUN = table(tables.ReconcileRun)
T_FINDING = table(tables.ReconcileFinding)

HOLDS_A_VERSION = T_EVENT.c.batch_id.is_not(None)
"""The ``received_event`` rows that hold a claim version (a second event id of one has no
batch): ``ux_received_event_version``'s predicate (``models.tables.HOLDS_A_VERSION``), which a
query by claim repeats so that the index serves it."""

KEY_COLS = ("subscriber_id", "group_id", "plan_year", "plan_type", "benefit_code")
"""An accumulator key's columns, in the order of :class:`models.events.AccumKey`."""
CENTS_OF = dict(zip(AMOUNTS, CLAIM_CENTS, strict=True))
"""Amount name -> its claim column."""


def awaits_flush(accum: Table = T_ACCUM) -> ColumnElement[bool]:
    """An accumulator waits for a flush: changed since its last push, or a write of unknown
    outcome to settle, and not held by a dead letter. Every reader (``status``, beat's fan-out,
    a flush's take) asks it this way."""
    a = accum.c
    return and_(a.held.is_(False), or_(a.dirty_since.is_not(None), a.intent_target.is_not(None)))


def claim_state(row: Any) -> ClaimState:
    """The ledger state of a ``claim`` row."""
    if row["subscriber_id"] is None:
        return ClaimState(row["version"], row["content_hash"], None, None)
    key: AccumKey = (
        row["subscriber_id"],
        row["group_id"],
        row["plan_year"],
        row["plan_type"],
        row["benefit_code"],
    )
    cents = tuple(sorted((a, row[c]) for a, c in CENTS_OF.items() if row[c]))
    return ClaimState(row["version"], row["content_hash"], key, row["network"], cents)
