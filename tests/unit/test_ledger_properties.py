"""The ledger's central property, on random streams: totals are a function of the set of events.

Any order and any number of duplicate deliveries give the same 30 totals per key, to the cent,
and they equal an independent fold of the events (``worker.demo.streams.expected_totals``). Checked
on the pure fold and on the real store (SQLite), split into random batches.
"""

from __future__ import annotations

from collections.abc import Sequence
from decimal import Decimal
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import Engine, text
from sqlmodel import Session

from models.buckets import AMOUNTS, BUCKETS
from models.events import ClaimEvent
from models.ledger import Fold, Kind, totals
from tests.stack import Stack, same_totals
from worker.db import make_engine, upgrade
from worker.demo.streams import expected_totals
from worker.ingest.store import ingest
from worker.ops.queries import outcomes
from worker.store.fold import fold_committed, in_session_of

KEYS = [("S1", "G1", "2026", "MED", b) for b in ("DED", "OOP")] + [
    ("S2", "G1", "2026", "RX", "GEN")
]
money = st.decimals(min_value=0, max_value=5000, places=2, allow_nan=False, allow_infinity=False)


@st.composite
def claim_versions(draw: st.DrawFn, claim: int) -> list[dict[str, Any]]:
    """Several versions of one claim: replacements, reversals, key and network moves."""
    out = []
    for version in sorted(draw(st.sets(st.integers(0, 6), min_size=1, max_size=4))):
        key = draw(st.sampled_from(KEYS))
        out.append(
            {
                "event_id": f"c{claim}-v{version}",
                "claim_id": f"c{claim}",
                "version": version,
                "status": draw(st.sampled_from(["adjudicated"] * 4 + ["reversed"])),
                "subscriber_id": key[0],
                "group_id": key[1],
                "plan_year": key[2],
                "plan_type": key[3],
                "benefit_code": key[4],
                "network": draw(st.sampled_from(["in", "out"])),
                "amounts": {a: str(draw(money)) for a in draw(st.sets(st.sampled_from(AMOUNTS)))},
            }
        )
    return out


@st.composite
def deliveries(draw: st.DrawFn) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(the set of events, one delivery of it: shuffled, each event 1-3 times)."""
    events = [e for c in range(draw(st.integers(1, 8))) for e in draw(claim_versions(c))]
    copies = [e for e in events for _ in range(draw(st.integers(1, 3)))]
    return events, draw(st.permutations(copies))


def as_vba(cents_by_key: dict[Any, dict[str, int]]) -> dict[Any, dict[str, Decimal]]:
    return {
        k: {
            f: Decimal(row[c]) / 100
            for b in BUCKETS
            for f, c in zip(b.vba_fields, b.columns, strict=True)
        }
        for k, row in cents_by_key.items()
    }


def pure_fold(stream: list[dict[str, Any]]) -> dict[Any, dict[str, Decimal]]:
    events = [ClaimEvent.model_validate(e) for e in stream]
    f = Fold({}, {}, {}).apply((e, e.content_hash()) for e in events)
    return as_vba(totals(f.current.values()))


@given(deliveries())
def test_pure_fold_equals_the_oracle_for_any_delivery(case: Any) -> None:
    """Every permutation with any duplication folds to the oracle's totals."""
    events, delivered = case
    assert same_totals(pure_fold(delivered), expected_totals(events)) == []


@settings(
    max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(case=deliveries(), cuts=st.lists(st.integers(1, 10), min_size=1, max_size=6))
def test_store_equals_the_oracle_across_batches(tmp_path: Path, case: Any, cuts: list[int]) -> None:
    """Ingested in random batches through the real store, the accumulators equal the oracle."""
    events, delivered = case
    db = tmp_path / f"p{abs(hash((str(delivered), tuple(cuts))))}.db"
    url = f"sqlite:///{db}"
    upgrade(url)
    engine = make_engine(url)
    ingest_in_batches(engine, delivered, cuts)
    engine.dispose()
    assert same_totals(Stack(tmp_path, database_url=url).totals(), expected_totals(events)) == []
    db.unlink()


def ingest_in_batches(
    engine: Engine,
    delivered: list[dict[str, Any]],
    cuts: list[int],
    folds: Sequence[bool] = (True,),
) -> None:
    """Ingest ``delivered`` through the real store, one transaction per batch of the cut sizes;
    fold after the n-th batch when ``folds`` says so (cycled), and after the last one always.
    (SQLite folds each batch in its own transaction: there the extra folds find nothing.)"""
    i, n = 0, 0
    while i < len(delivered):
        size = cuts[n % len(cuts)]
        with Session(engine) as session:
            ingest(session, delivered[i : i + size])
            session.commit()
        if folds[n % len(folds)]:
            fold_committed(in_session_of(engine))
        i, n = i + size, n + 1
    fold_committed(in_session_of(engine))


CONFLICTING_COPAY = "7777.77"  # above every amount the strategies draw: always other content


@st.composite
def with_conflicts(draw: st.DrawFn) -> list[dict[str, Any]]:
    """A delivery with conflicts among it, anywhere in the stream: an event id delivered again
    with other content, a version delivered again under a new event id with other content, and
    one event's content delivered under another's id (an id reused on another version)."""
    _, delivered = draw(deliveries())
    out = list(delivered)
    for n in range(draw(st.integers(1, 4))):
        base = draw(st.sampled_from(delivered))
        kind = draw(st.sampled_from(["same id", "new id", "other id"]))
        if kind == "other id":
            changed = {**base, "event_id": draw(st.sampled_from(delivered))["event_id"]}
        else:
            changed = {**base, "amounts": {**base["amounts"], "copay": CONFLICTING_COPAY}}
        if kind == "new id":
            changed["event_id"] = f"{base['event_id']}-again{n}"
        out.insert(draw(st.integers(0, len(out))), changed)
    return out


def sequential_law(delivered: list[dict[str, Any]]) -> tuple[Fold, set[tuple[str, str]]]:
    """models.ledger's Fold over ``delivered`` in order, and the (event_id, hash) it receives."""
    events = [ClaimEvent.model_validate(e) for e in delivered]
    fold = Fold({}, {}, {}).apply((e, e.content_hash()) for e in events)
    return fold, {(e.event_id, h) for e, h in fold.received}


def recorded_and_conflicts(engine: Engine) -> tuple[set[tuple[str, str]], int]:
    """The store's received (event_id, content hash) and its conflict count."""
    with Session(engine) as session:
        rows = session.execute(text("SELECT event_id, content_hash FROM received_event")).all()
        conflicts = outcomes(session)["conflict"]
    return {(e, h) for e, h in rows}, conflicts


@settings(
    max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(delivered=with_conflicts(), cuts=st.lists(st.integers(1, 10), min_size=1, max_size=6))
def test_store_equals_the_sequential_law_with_conflicts(
    tmp_path: Path, delivered: list[dict[str, Any]], cuts: list[int]
) -> None:
    """With conflicts the first content received wins, so the order matters: the store, fed in
    batches, records the same events as models.ledger's Fold fed one by one, refuses as many,
    and holds the totals of the claim states that Fold ends with."""
    db = tmp_path / f"c{abs(hash((str(delivered), tuple(cuts))))}.db"
    url = f"sqlite:///{db}"
    upgrade(url)
    engine = make_engine(url)
    ingest_in_batches(engine, delivered, cuts)
    fold, received = sequential_law(delivered)
    assert recorded_and_conflicts(engine) == (received, fold.counts[Kind.CONFLICT])
    engine.dispose()
    expected = as_vba(totals(fold.current.values()))
    assert same_totals(Stack(tmp_path, database_url=url).totals(), expected) == []
    db.unlink()
