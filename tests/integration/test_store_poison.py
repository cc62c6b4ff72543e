"""Poison the store itself would refuse, on Postgres and SQLite: each becomes a dead letter and
its neighbours are applied. NUL in text made Postgres refuse the dead letter's own row, and a
lone surrogate made the UTF-8 encoder raise; both failed the whole batch, for ever or for good.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import Engine, select, text
from sqlmodel import Session

from models.tables import DeadLetter
from tests.stack import FULL, plant_full_total
from tests.unit.test_events import BASE
from worker.db import make_engine
from worker.ingest.store import ingest
from worker.store.dead_letters import storable
from worker.store.fold import fold_committed, in_session_of

LONE_SURROGATE = json.loads('"e\\ud800x"')  # what a JSON parser makes of "\ud800"

POISON: dict[str, Any] = {
    "a text line with NUL": "line with \x00 inside",
    "an unknown field whose name holds NUL": {**BASE, "x\x00y": 1},
    "an event_id with a lone surrogate": {**BASE, "event_id": LONE_SURROGATE},
    "a text line with a lone surrogate": f"line {LONE_SURROGATE}",
    "NUL in a code": {**BASE, "event_id": "e-nul", "benefit_code": "D\x00D"},
}


@pytest.fixture
def engine(store_url: str) -> Iterator[Engine]:
    yield (eng := make_engine(store_url))
    eng.dispose()


@pytest.mark.parametrize("kind", list(POISON))
def test_poison_is_dead_lettered_and_its_neighbours_applied(engine: Engine, kind: str) -> None:
    good = {**BASE, "event_id": "e-good", "claim_id": "c-good"}
    with Session(engine) as session:
        result = ingest(session, [POISON[kind], good])
        session.commit()
    folded = fold_committed(in_session_of(engine))
    assert (result.applied + folded.applied, result.invalid) == (1, 1)
    with Session(engine) as session:
        (letter,) = session.exec(select(DeadLetter)).scalars().all()  # type: ignore[call-overload]
    assert "\x00" not in letter.payload + letter.reason
    assert letter.payload == storable(letter.payload)


def test_storable_escapes_only_what_no_store_takes() -> None:
    assert storable("plain ✓ text") == "plain ✓ text"
    assert storable("a\x00b") == "a\\u0000b"
    assert storable(f"x{LONE_SURROGATE}") == "xe\\ud800x"


def test_a_version_refused_at_fold_time_is_folded_when_sent_again(engine: Engine) -> None:
    """A version the fold refuses (its key's total past 64 bits) is quarantined: dead-lettered
    and forgotten as received, so that sending it again can bring it back. A second event id of
    that version, recorded with no batch, does not hold it: once the total has room, the version
    sent again is folded (up to 0016 that id's row made it a duplicate, never folded). On SQLite
    the total is refused too, never stored as a float (SQLite's ``+`` makes a ``REAL`` of an
    integer sum past 64 bits)."""
    first = {**BASE, "event_id": "e-1", "claim_id": "c-full", "amounts": {"copay": "25.00"}}
    again = {**first, "event_id": "e-2"}  # the same version under a second id
    with engine.begin() as conn:  # the key's accumulator, full
        plant_full_total(conn, BASE, "copay_total")
    with Session(engine) as session:
        assert ingest(session, [first, again]).duplicate == 1
        session.commit()
    fold_committed(in_session_of(engine))  # Postgres; SQLite folded in the ingest
    with engine.begin() as conn:
        letters = conn.execute(text("SELECT event_id FROM dead_letter")).scalars().all()
        total = conn.execute(text("SELECT copay_total FROM accumulator")).scalar_one()
        assert (letters, total) == (["e-1"], FULL), "the full total was not refused"
        conn.execute(text("UPDATE accumulator SET copay_total = 0"))  # room again
    with Session(engine) as session:
        sent_again = ingest(session, [first])
        session.commit()
    assert sent_again.duplicate == 0, sent_again
    fold_committed(in_session_of(engine))
    with engine.connect() as conn:
        assert conn.execute(text("SELECT copay_total FROM accumulator")).scalar_one() == 2500
