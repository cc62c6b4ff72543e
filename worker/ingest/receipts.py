"""Receipts: which events of a stream the ledger has recorded, so a producer knows, not hopes.

An event is *recorded* once its id is in ``received_event`` (applied, a duplicate of one that
was, or stale: each counts once), *refused* when its id is in an open or closed ingest dead
letter (invalid: publishing it again changes nothing; fix it and ``dead-letters replay``), and
*missing* otherwise: never delivered, or not yet. Missing events are safe to publish again, as
often as needed: an event id counts once.

:func:`publish_confirmed` publishes, waits, and publishes again what is still missing.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import select
from sqlmodel import Session

from worker.db import session_scope
from worker.ingest.producer import publish
from worker.store.tables import T_DEAD, T_EVENT

#: Ids asked of the store per query.
CHUNK = 1_000


@dataclass(frozen=True)
class Receipts:
    """A stream's events by what the ledger knows of them (ids in the stream's order, once)."""

    recorded: list[str] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    #: Lines with no usable ``event_id`` (1-based positions in the stream): no receipt exists.
    unidentified: list[int] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        """Every event of the stream is recorded."""
        return not (self.refused or self.missing or self.unidentified)

    def as_json(self) -> dict[str, Any]:
        counts = {k: len(v) for k, v in vars(self).items()}
        return {"counts": counts} | {k: list(v) for k, v in vars(self).items()}


def event_ids(events: Iterable[Any]) -> tuple[list[str], list[int]]:
    """The stream's event ids in order, once each, and the positions of lines without one."""
    ids: dict[str, None] = {}
    unidentified = []
    for position, event in enumerate(events, 1):
        event_id = event.get("event_id") if isinstance(event, dict) else None
        if isinstance(event_id, str) and event_id:
            ids[event_id] = None
        else:
            unidentified.append(position)
    return list(ids), unidentified


def receipts(events: Iterable[Any], session: Session | None = None) -> Receipts:
    """What the ledger knows of each event of ``events`` (ClaimEvent dicts, as published)."""
    ids, unidentified = event_ids(events)
    if session is None:
        with session_scope() as own:
            return receipts_of(own, ids, unidentified)
    return receipts_of(session, ids, unidentified)


def again(before: Receipts) -> Receipts:
    """``before`` with its missing events asked again (what is recorded stays recorded)."""
    with session_scope() as session:
        now = receipts_of(session, before.missing, before.unidentified)
    return Receipts(
        recorded=before.recorded + now.recorded,
        refused=before.refused + now.refused,
        missing=now.missing,
        unidentified=before.unidentified,
    )


def receipts_of(session: Session, ids: Sequence[str], unidentified: list[int]) -> Receipts:
    recorded: set[str] = set()
    refused: set[str] = set()
    event, dead = T_EVENT.c, T_DEAD.c
    for start in range(0, len(ids), CHUNK):
        chunk = ids[start : start + CHUNK]
        recorded.update(session.scalars(select(event.event_id).where(event.event_id.in_(chunk))))
        ask = select(dead.event_id).where(dead.source == "ingest", dead.event_id.in_(chunk))
        refused.update(i for i in session.scalars(ask) if i is not None)
    return Receipts(
        recorded=[i for i in ids if i in recorded],
        refused=[i for i in ids if i in refused and i not in recorded],
        missing=[i for i in ids if i not in recorded and i not in refused],
        unidentified=unidentified,
    )


@dataclass(frozen=True)
class Confirmation:
    """What :func:`publish_confirmed` did: events sent per round (the first is the stream), and
    the receipts at the end."""

    sent: list[int]
    receipts: Receipts
    waited: float

    def as_json(self) -> dict[str, Any]:
        rounds = {"published_per_round": self.sent, "waited_seconds": round(self.waited, 1)}
        return rounds | self.receipts.as_json()


def publish_confirmed(
    events: Sequence[Any],
    within: float = 60.0,
    rounds: int = 3,
    batch_size: int | None = None,
    on_round: Callable[[int, int], None] | None = None,
    poll: float = 0.5,
) -> Confirmation:
    """Publish ``events``, then wait for every event id to be recorded or refused; once the
    ledger has recorded none of the missing for ``within`` seconds (a backlog still draining
    keeps the wait going), publish the missing ones again, up to ``rounds`` publishes in all.
    Returns what it did and the receipts at the end (``complete``: everything recorded).

    ``on_round(round, events)`` is told of each publish. A line without an event id has no
    receipt and is published once only."""
    by_id = {e["event_id"]: e for e in events if isinstance(e, dict) and e.get("event_id")}
    started = time.monotonic()
    sent = [publish(events, batch_size)]
    if on_round:
        on_round(1, sent[0])
    now = receipts(events)
    while True:
        quiet_since = time.monotonic()
        while now.missing and time.monotonic() - quiet_since < within:
            time.sleep(poll)
            before, now = len(now.missing), again(now)
            if len(now.missing) < before:
                quiet_since = time.monotonic()
        if not now.missing or len(sent) >= rounds:
            return Confirmation(sent, now, time.monotonic() - started)
        resend = [by_id[i] for i in now.missing]
        sent.append(publish(resend, batch_size))
        if on_round:
            on_round(len(sent), sent[-1])
