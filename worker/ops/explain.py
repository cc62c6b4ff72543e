"""``accumsync explain``: why a member's totals are what they are, for the operator's terminal.

Per key: our total per VBA field and the claims that make it (each claim's current version, the
versions received, its network and amounts), what VBA last confirmed and when (with the batch
call's activityId), a write in flight, retries, holds and dead letters. It is member data on
purpose and goes to the terminal only: nothing here logs.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlmodel import Session

from models.buckets import COLUMN_TO_VBA, COLUMNS
from models.events import canon
from models.ledger import totals
from models.sync import money
from models.tables import PUSHED
from worker.store.tables import (
    CENTS_OF,
    HOLDS_A_VERSION,
    KEY_COLS,
    T_ACCUM,
    T_ATTEMPT,
    T_CLAIM,
    T_DEAD,
    T_EVENT,
    T_PAIR,
    claim_state,
)


class NotFound(LookupError):
    """No accumulator of that member here (the message says what was looked for)."""


def explain(
    session: Session, subscriber: str, group: str, benefit: str | None = None
) -> dict[str, Any]:
    """The member's keys (one benefit's, when given), each with its totals and their story."""
    sub, grp = canon(subscriber), canon(group)
    p = T_PAIR.c
    pair = (
        session.execute(select(T_PAIR).where(p.subscriber_id == sub, p.group_id == grp))
        .mappings()
        .one_or_none()
    )
    if pair is None:
        raise NotFound(
            "no accumulators here for that subscriber and group (keys compare "
            "case-insensitively, trailing spaces ignored)"
        )
    a, c = T_ACCUM.c, T_CLAIM.c
    accums = select(T_ACCUM).where(a.pair_id == pair["id"])
    claims = select(T_CLAIM).where(c.subscriber_id == sub, c.group_id == grp)
    if benefit is not None:
        accums = accums.where(a.benefit_code == canon(benefit))
        claims = claims.where(c.benefit_code == canon(benefit))
    keys = session.execute(accums.order_by(*(a[k] for k in KEY_COLS))).mappings().all()
    if not keys:
        raise NotFound(f"no accumulator of benefit {canon(benefit or '')!r} for that member")
    claim_rows = session.execute(claims.order_by(c.claim_id)).mappings().all()
    versions = _versions(session, [r["claim_id"] for r in claim_rows])
    letters = _letters(session, [k["id"] for k in keys])
    by_key: dict[tuple[str, ...], list[Any]] = {}
    for r in claim_rows:
        by_key.setdefault(_key_of(r), []).append(r)
    summed: dict[Any, dict[str, int]] = totals(claim_state(r) for r in claim_rows)
    nothing = dict.fromkeys(COLUMNS, 0)
    return {
        "subscriber_id": sub,
        "group_id": grp,
        "pair": _pair(session, pair),
        "keys": [
            _key(k, by_key.get(_key_of(k), []), summed.get(_key_of(k), nothing), versions, letters)
            for k in keys
        ],
    }


def _key_of(row: Any) -> tuple[str, ...]:
    return tuple(row[k] for k in KEY_COLS)


def _key(
    row: Any,
    claims: list[Any],
    from_claims: dict[str, int],
    versions: dict[str, list[dict[str, Any]]],
    letters: dict[int, list[dict[str, Any]]],
) -> dict[str, Any]:
    ours = {col: row[col] for col in COLUMNS}
    pushed = {col: row[p] for col, p in zip(COLUMNS, PUSHED, strict=True)}
    fields = [
        {
            "field": COLUMN_TO_VBA[col],
            "ours": money(ours[col]),
            "confirmed": money(pushed[col]),
            "claims": money(from_claims[col]),
        }
        for col in COLUMNS
        if ours[col] or pushed[col] or from_claims[col]
    ]
    return {
        "plan_year": row["plan_year"],
        "plan_type": row["plan_type"],
        "benefit_code": row["benefit_code"],
        "totals": fields,
        "adds_up": all(ours[col] == from_claims[col] for col in COLUMNS),
        "claims": [_claim(r, versions.get(r["claim_id"], [])) for r in claims],
        "state": _state(row),
        "dead_letters": letters.get(row["id"], []),
    }


def _claim(row: Mapping[str, Any], received: list[dict[str, Any]]) -> dict[str, Any]:
    amounts = {name: money(row[col]) for name, col in CENTS_OF.items() if row[col]}
    current = [v for v in received if v["version"] == row["version"]]
    return {
        "claim_id": row["claim_id"],
        "version": row["version"],
        "status": "adjudicated",  # a reversed claim names no member and adds to no key
        "network": row["network"],
        "amounts": amounts,
        "received_at": _when(current[-1]["received_at"]) if current else None,
        "versions_received": [v["version"] for v in received],
    }


def _state(row: Mapping[str, Any]) -> dict[str, Any]:
    if row["held"]:
        what = "held for an operator (see its dead letter)"
    elif row["intent_target"] is not None:
        what = "a write in flight: its outcome is settled by the next flush"
    elif row["dirty_since"] is not None:
        what = "changed, waiting for the next flush"
    else:
        what = "VBA holds what we confirmed"
    in_flight = None
    if row["intent_target"] is not None:
        in_flight = {"since": _when(row["intent_at"]), "target": _money_of(row["intent_target"])}
    return {
        "what": what,
        "waiting_since": _when(row["dirty_since"]),
        "in_flight": in_flight,
        "attempts": row["attempts"],
        "next_attempt_at": _when(row["next_attempt_at"]),
    }


def _money_of(raw: str) -> dict[str, str]:
    cents = json.loads(raw)
    return {COLUMN_TO_VBA[col]: money(cents[col]) for col in COLUMNS if cents.get(col)}


def _pair(session: Session, pair: Any) -> dict[str, Any]:
    """The pair's flush: last confirmed call (time, activityId), retries, last error."""
    t = T_ATTEMPT.c
    ok = t.outcome.in_(("ok", "partial", "recovered"))
    last = session.execute(
        select(t.started_at, t.activity_id, t.outcome)
        .where(t.pair_id == pair["id"], ok)
        .order_by(t.started_at.desc())
        .limit(1)
    ).one_or_none()
    return {
        "last_confirmed_at": _when(last.started_at) if last else None,
        "last_activity_id": last.activity_id if last else None,
        "attempts": pair["attempts"],
        "next_attempt_at": _when(pair["next_attempt_at"]),
        "last_error": pair["last_error"],
    }


def _versions(session: Session, claim_ids: list[str]) -> dict[str, list[dict[str, Any]]]:
    e = T_EVENT.c
    out: dict[str, list[dict[str, Any]]] = {}
    if not claim_ids:
        return out
    # Each version once, by its unique index.
    query = select(e.claim_id, e.version, e.received_at)
    query = query.where(e.claim_id.in_(claim_ids), HOLDS_A_VERSION)
    for r in session.execute(query.order_by(e.claim_id, e.version, e.received_at)):
        out.setdefault(r.claim_id, []).append({"version": r.version, "received_at": r.received_at})
    return out


def _letters(session: Session, accumulator_ids: list[int]) -> dict[int, list[dict[str, Any]]]:
    d = T_DEAD.c
    query = select(T_DEAD).where(d.accumulator_id.in_(accumulator_ids)).order_by(d.id)
    out: dict[int, list[dict[str, Any]]] = {}
    for r in session.execute(query).mappings():
        out.setdefault(r["accumulator_id"], []).append(
            {
                "id": r["id"],
                "kind": r["kind"],
                "reason": r["reason"],
                "count": r["count"],
                "last_seen": _when(r["last_seen"]),
                "activity_id": r["activity_id"],
                "open": r["replayed_at"] is None,
                "resolution": r["resolution"],
            }
        )
    return out


def _when(moment: datetime | None) -> str | None:
    return None if moment is None else moment.strftime("%Y-%m-%d %H:%M:%S UTC")
