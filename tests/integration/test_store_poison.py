"""Poison the store itself would refuse, on Postgres and SQLite: each becomes a dead letter and
its neighbours are applied. NUL in text made Postgres refuse the dead letter's own row, and a
lone surrogate made the UTF-8 encoder raise; both failed the whole batch, for ever or for good.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import Engine, select
from sqlmodel import Session

from models.tables import DeadLetter
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
