"""The dispatcher's election on a SQLite store: one leads, another waits, the lead passes on when
the leader's lease lapses or it resigns; health names the leader."""

from __future__ import annotations

import json

from sqlalchemy import update

from worker import db
from worker.flush.dispatch import LEADER, leader, take_lead
from worker.ops.health import dispatcher_check
from worker.store.tables import T_SHARED

A = json.dumps({"host": "a", "id": "1", "pid": 1}, sort_keys=True)
B = json.dumps({"host": "b", "id": "2", "pid": 2}, sort_keys=True)


def lead(me: str) -> bool:
    return db.in_transaction(lambda s: take_lead(s, me))


def test_one_leads_the_other_waits_until_the_lease_lapses(store: str) -> None:
    with db.session_scope() as session:
        assert (
            dispatcher_check(session).reason == "none leads: each flush waits for beat's next tick"
        )
    assert lead(A) and not lead(B) and lead(A) and not lead(B)  # A renews; B waits
    with db.session_scope() as session:
        assert leader(session) == {"host": "a", "id": "1", "pid": 1}
        assert dispatcher_check(session).reason == "leading: a:1"
        lapsed = update(T_SHARED).where(T_SHARED.c.name == LEADER)
        session.execute(lapsed.values(until=db.db_after(-1)))  # A died: its lease ran out
    with db.session_scope() as session:
        assert leader(session) is None
    assert lead(B) and not lead(A)
