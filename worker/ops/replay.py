"""``accumsync dead-letters replay`` and ``resolve``: give refused work another chance after a fix,
and settle the keys held for a person.

- An ingest dead letter is re-published as it arrived (the worker validates it again: still
  bad, it comes back as the same letter, reopened and counted).
- A flush dead letter releases its accumulator: attempts reset, no longer held, so the next
  flush sends it.
- A plans dead letter puts its record back into its plan's pending push, sent at once.
- A broker dead letter (a message no task could run) is never replayed: its producer is fixed
  and publishes the events again.
- A hold (an ambiguous outcome, a row below our share) is never replayed: a person checks VBA
  and says what happened with ``resolve``, which sets our confirmed share accordingly.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from sqlalchemy import Row, func, select, update
from sqlmodel import Session

from models.buckets import COLUMN_TO_VBA, COLUMNS
from models.sync import HOLDS, LetterKind
from models.tables import PUSHED
from worker.db import utcnow
from worker.flush.plans import requeue
from worker.flush.protocol import bump_pushed_seq
from worker.store.tables import T_ACCUM, T_DEAD

NO_INTENT = dict.fromkeys(("intent_target", "intent_ours", "intent_seq", "intent_before"))
RELEASED = {"held": False, "attempts": 0, "next_attempt_at": None, "intent_at": None}


@dataclass
class Replayed:
    """What a replay did: events to re-publish, accumulators released, plans to send again,
    and the letters it would not replay, each with why."""

    events: list[Any] = field(default_factory=list)
    released: int = 0
    plans: list[str] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)


def replay(session: Session, ids: list[int] | None = None, source: str | None = None) -> Replayed:
    """Close the chosen open letters that can be replayed (the caller commits)."""
    d = T_DEAD.c
    query = select(T_DEAD).where(d.replayed_at.is_(None))
    if ids:
        query = query.where(d.id.in_(ids))
    if source:
        query = query.where(d.source == source)
    done = Replayed()
    letters = session.execute(query.order_by(d.id)).all()
    closed = [letter.id for letter in letters if _replay_one(session, letter, done)]
    # Written now, in the caller's transaction: the row locks make a worker re-refusing a
    # replayed event wait for our commit, so its reopening of the letter lands after (not under)
    # our "replayed".
    for start in range(0, len(closed), 900):
        part = closed[start : start + 900]
        session.execute(update(T_DEAD).where(d.id.in_(part)).values(replayed_at=utcnow()))
    return done


def _replay_one(session: Session, letter: Row[Any], done: Replayed) -> bool:
    """Replay one letter into ``done``; False (with the reason noted) when it can't be."""
    if letter.source == "ingest":
        item = _payload(letter.payload)
        # A whole batch as one item: a worker of a release before the JSON-text messages
        # (worker/ingest/wire.py) refused one as "not a JSON object". Its events go again.
        done.events.extend(item if isinstance(item, list) else [item])
    elif letter.source == "plans":
        try:
            plan_id = requeue(session, letter.id, letter.payload)
        except ValueError as exc:
            done.refused.append(str(exc))
            return False
        done.plans = sorted({*done.plans, plan_id})
    elif letter.source == "broker":
        done.refused.append(
            f"letter {letter.id}: a message no task could run ({letter.kind}) is not replayed; "
            "fix its producer and publish the events again (`dead-letters list --source broker "
            "--show-payload` shows the body)"
        )
        return False
    elif letter.kind in HOLDS:
        done.refused.append(
            f"letter {letter.id}: a {letter.kind} hold is settled with "
            f"`accumsync dead-letters resolve {letter.id} --landed|--not-landed`, not replayed"
        )
        return False
    elif letter.accumulator_id is not None:
        a = T_ACCUM.c
        release = update(T_ACCUM).where(a.id == letter.accumulator_id).values(held=False)
        session.execute(release.values(attempts=0, next_attempt_at=None))
        done.released += 1
    return True


class NotResolvable(ValueError):
    """The letter is not an open hold, or the answer does not fit it."""


def resolve(session: Session, letter_id: int, landed: bool) -> str:
    """Settle a held key as an operator found VBA: our write ``landed`` or not (for a row
    below our share: what VBA shows in the fields named is what is left of ours, or not ours at
    all). Returns what was done. The next flush then sends whatever is still ours to send."""
    letter = session.execute(select(T_DEAD).where(T_DEAD.c.id == letter_id)).one_or_none()
    if letter is None or letter.source != "flush" or letter.kind not in HOLDS:
        raise NotResolvable(f"letter {letter_id} is not a hold (see `dead-letters list`)")
    if letter.replayed_at is not None:
        raise NotResolvable(f"letter {letter_id} was closed at {letter.replayed_at:%F %T} UTC")
    assert letter.accumulator_id is not None
    a = T_ACCUM.c
    row = session.execute(select(T_ACCUM).where(a.id == letter.accumulator_id)).mappings().one()
    values = _settled(letter, row, landed)
    session.execute(update(T_ACCUM).where(a.id == row["id"], a.held.is_(True)).values(values))
    bump_pushed_seq(session, [row["id"]])
    if landed and letter.kind == LetterKind.AMBIGUOUS:  # clean, unless the ledger moved since
        same = update(T_ACCUM).where(a.id == row["id"], a.change_seq == row["intent_seq"])
        session.execute(same.values(dirty_since=None))
    resolution = "landed" if landed else "not_landed"
    closed = update(T_DEAD).where(T_DEAD.c.id == letter_id)
    session.execute(closed.values(replayed_at=utcnow(), resolution=resolution))
    return f"letter {letter_id} resolved as {resolution}: accumulator released"


def _settled(letter: Row[Any], row: Any, landed: bool) -> dict[str, Any]:
    """The accumulator's new confirmed share and state for the operator's answer."""
    values: dict[str, Any] = dict(RELEASED) | NO_INTENT
    if letter.kind == LetterKind.BELOW_SHARE:  # the key is sent again (a repair held it clean)
        dirty = func.coalesce(T_ACCUM.c.dirty_since, utcnow())
        return values | _below_share_settled(letter, landed) | {"dirty_since": dirty}
    if row["intent_ours"] is None:
        raise NotResolvable(f"letter {letter.id}: the accumulator has no write to settle")
    if landed:
        ours = json.loads(row["intent_ours"])
        values |= {p: ours[c] for c, p in zip(COLUMNS, PUSHED, strict=True)}
    return values


def _below_share_settled(letter: Row[Any], landed: bool) -> dict[str, int]:
    """Only the fields the hold names change, each to the share the operator's answer gives
    it: nothing of ours (not landed: VBA's value is its own), or VBA's value as it was when
    the hold was made (landed: what is left there is ours). The other fields keep theirs."""
    detail = _payload(letter.payload)
    column_of = {vba: c for c, vba in COLUMN_TO_VBA.items()}
    fields = {f: v for f, v in detail.items() if f in column_of and isinstance(v, dict)}
    if not fields:
        raise NotResolvable(f"letter {letter.id}: it names no field below our share")
    return {
        f"pushed_{column_of[f]}": cents(v["vba_now"]) if landed else 0 for f, v in fields.items()
    }


def cents(money: str) -> int:
    """A dead letter's 2-decimal amount as cents."""
    return int(Decimal(money).scaleb(2))


def _payload(text: str) -> Any:
    """The event as it arrived: JSON back to an object, unparsable text as the text itself."""
    try:
        return json.loads(text)
    except ValueError:
        return text
