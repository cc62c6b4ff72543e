"""Concurrent batches on a real Postgres: two sessions, two transactions, one event id.

Batches run side by side, on the same claims or not (migration 0017). What two batches can
share, an event id or a claim version, is held by one row each (the primary key; the unique
index over the rows holding a version), so the second batch's insert waits for the first's
transaction and then sees its row. Nothing else of one claim makes a batch wait.
"""

from __future__ import annotations

import threading
from typing import Any

import pytest
from sqlalchemy import Engine, select, text
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session

from models.tables import DeadLetter, ReceivedEvent
from tests.unit.test_events import BASE
from worker import db
from worker.ingest.poison import isolating
from worker.ingest.store import IngestCounts, ingest
from worker.settings import get_settings
from worker.store.fold import FoldReport, fold_committed, fold_round, in_session_of
from worker.store.tables import T_ACCUM

pytestmark = pytest.mark.integration


def event(claim_id: str, copay: str) -> dict[str, Any]:
    """The same event id on ``claim_id``, with its own copay (so different content)."""
    return {**BASE, "event_id": "evt-reused", "claim_id": claim_id, "amounts": {"copay": copay}}


def waiting_in(pg_engine: Engine) -> str | None:
    """The statement another backend of this database waits for a lock in right now (its first
    words), if one does."""
    with pg_engine.connect() as conn:
        waiting = conn.execute(
            text(
                "SELECT left(query, 40) FROM pg_stat_activity WHERE datname = current_database() "
                "AND wait_event_type = 'Lock'"
            )
        ).scalar()
    return None if waiting is None else str(waiting)


RECORDING = "INSERT INTO received_event"
"""Where a batch waits for a concurrent one holding its event id or version."""
COUNTING = "INSERT INTO event_counter"
"""Where a batch of this process waits for another batch of this process, at its end: both add
to this process's rows of the counters (worker/store/counters.py; the workers' processes add to
rows of their own)."""


def in_(waited: str | None, statement: str) -> bool:
    return waited is not None and waited.startswith(statement)


def concurrently(
    pg_engine: Engine, first_batch: list[dict[str, Any]], second_batch: list[dict[str, Any]]
) -> tuple[IngestCounts, IngestCounts, str | None, FoldReport]:
    """Ingest ``first_batch`` in one session and, before it commits, ``second_batch`` in another;
    the two outcomes, the statement the second was waiting in when the first committed (None:
    it was not waiting), and what the fold of both then did."""
    first, second = Session(pg_engine), Session(pg_engine)
    outcome: dict[str, IngestCounts] = {}

    def ingest_second() -> None:
        outcome["second"] = ingest(second, second_batch)
        second.commit()

    try:
        outcome["first"] = ingest(first, first_batch)  # not committed yet
        thread = threading.Thread(target=ingest_second)
        thread.start()
        thread.join(timeout=3)
        waited = waiting_in(pg_engine) if thread.is_alive() else None
        first.commit()
        thread.join(timeout=30)
        assert not thread.is_alive()
    finally:
        first.close()
        second.close()
    return outcome["first"], outcome["second"], waited, fold_committed(in_session_of(pg_engine))


def stored(pg_engine: Engine) -> tuple[list[int], list[str], list[tuple[str, str, int]]]:
    """(copay totals, dead-letter reasons, received (event_id, claim_id, version)) of the
    store."""
    with Session(pg_engine) as s:
        copay = s.execute(select(T_ACCUM.c.copay_total)).scalars().all()
        letters = s.execute(select(DeadLetter.reason)).scalars().all()  # type: ignore[call-overload]
        received = s.execute(
            select(ReceivedEvent.event_id, ReceivedEvent.claim_id, ReceivedEvent.version)
        ).all()  # type: ignore[call-overload]
    return list(copay), list(letters), sorted(map(tuple, received))


def test_one_event_id_on_two_claims_in_concurrent_batches_counts_once(pg_engine: Engine) -> None:
    """The second batch waits for the first, sees its event id and dead-letters a conflict."""
    first, second, waited, folded = concurrently(
        pg_engine, [event("claim-a", "10.00")], [event("claim-b", "20.00")]
    )
    copay, letters, received = stored(pg_engine)
    assert sum(copay) == 1000, f"copay counted {sum(copay) / 100:.2f}, the contract gives 10.00"
    assert (first.recorded, second.conflict, folded.applied) == (1, 1, 1)
    assert letters == ["event_id: already received with different content"]
    assert received == [("evt-reused", "claim-a", 0)]
    assert in_(waited, RECORDING), f"the second batch waited in {waited!r}, not for the event id"


def version(event_id: str, number: int, copay: str) -> dict[str, Any]:
    """Version ``number`` of claim-new, a claim the store has no row of before the test."""
    identity = {"event_id": event_id, "claim_id": "claim-new", "version": number}
    return {**BASE, **identity, "amounts": {"copay": copay}}


def test_one_version_of_a_new_claim_with_two_contents_in_concurrent_batches_counts_once(
    pg_engine: Engine,
) -> None:
    """The second batch waits on the version the first holds, uncommitted, of a claim with no
    row yet, then finds it received with other content (a conflict), not a new claim."""
    first, second, waited, folded = concurrently(
        pg_engine, [version("evt-1", 1, "10.00")], [version("evt-2", 1, "20.00")]
    )
    copay, letters, received = stored(pg_engine)
    assert sum(copay) == 1000, f"copay counted {sum(copay) / 100:.2f}, the contract gives 10.00"
    assert (first.recorded, second.conflict, folded.applied) == (1, 1, 1)
    assert letters == ["claim_id+version: version 1 already received with different content"]
    assert received == [("evt-1", "claim-new", 1)]
    assert in_(waited, RECORDING), f"the second batch waited in {waited!r}, not for the version"


def test_two_versions_of_a_new_claim_in_concurrent_batches_leave_the_highest(
    pg_engine: Engine,
) -> None:
    """The two batches record their versions side by side (the second waits, if at all, only
    at its end, for the counters its process shares with the first); the lower version, arriving
    second, is stale: the claim contributes version 2 only."""
    _, _, waited, folded = concurrently(
        pg_engine, [version("evt-2", 2, "20.00")], [version("evt-1", 1, "10.00")]
    )
    copay, letters, received = stored(pg_engine)
    assert sum(copay) == 2000, f"copay counted {sum(copay) / 100:.2f}, the contract gives 20.00"
    assert (folded.applied, folded.stale, letters) == (1, 1, [])
    assert received == [("evt-1", "claim-new", 1), ("evt-2", "claim-new", 2)]
    assert waited is None or in_(waited, COUNTING), f"the second batch waited in {waited!r}"


def test_received_row_is_the_event_the_batch_applied_not_its_first_delivery(
    pg_engine: Engine,
) -> None:
    """An id whose first delivery in a batch is refused keeps the row of the one applied."""
    stored = {**BASE, "event_id": "evt-0", "claim_id": "claim-c", "version": 1}
    clash = {**stored, "event_id": "evt-1", "amounts": {"copay": "99.00"}}  # version 1 again
    later = {**stored, "event_id": "evt-1", "version": 2, "amounts": {"copay": "5.00"}}
    with Session(pg_engine) as s:
        ingest(s, [stored])
        s.commit()
    with Session(pg_engine) as s:
        result = ingest(s, [clash, later])
        s.commit()
    assert (result.conflict, result.recorded) == (1, 1)
    with Session(pg_engine) as s:
        rows = s.execute(select(ReceivedEvent.event_id, ReceivedEvent.version)).all()  # type: ignore[call-overload]
    assert sorted(map(tuple, rows)) == [("evt-0", 1), ("evt-1", 2)]


def test_two_batches_making_one_new_pair_both_land_on_it(pg_engine: Engine) -> None:
    """Two batches on different claims of one new member, recorded side by side: the fold of
    both makes one (subscriber, group) pair, and both keys' rows name it."""
    same_member = {"subscriber_id": "S0000042", "group_id": "GRPNEW"}
    first_batch = [{**BASE, **same_member, "event_id": "evt-a", "claim_id": "claim-a"}]
    second_batch = [
        {**BASE, **same_member, "event_id": "evt-b", "claim_id": "claim-b", "benefit_code": "RX"}
    ]
    first, second, waited, folded = concurrently(pg_engine, first_batch, second_batch)
    assert (first.recorded, second.recorded, folded.applied) == (1, 1, 2)
    with Session(pg_engine) as s:
        pairs = s.execute(text("SELECT id FROM pair")).scalars().all()
        named = s.execute(text("SELECT pair_id FROM accumulator ORDER BY benefit_code")).all()
    assert len(pairs) == 1 and [p for (p,) in named] == [pairs[0], pairs[0]]
    assert waited is None or in_(waited, COUNTING), f"the second batch waited in {waited!r}"


#: How a worker of a release before migration 0013 locked a claim: it rewrote the claim's row,
#: or stored a placeholder for a claim not stored yet, with the row's default version, -1.
OLDER_RELEASE_LOCK = text(
    "INSERT INTO claim (claim_id, version, content_hash) VALUES (:claim, -1, '') "
    "ON CONFLICT (claim_id) DO UPDATE SET claim_id = excluded.claim_id RETURNING version"
)


@pytest.mark.parametrize("claim", ["claim-stored", "claim-unseen"])
def test_an_older_releases_worker_cannot_lock_a_claim_beside_this_one(
    pg_engine: Engine, claim: str
) -> None:
    """During a rolling upgrade an older worker's lock (which this release's advisory locks
    would not see) is refused by the store, for a claim stored or not: its batch is retried
    until a worker of this release takes it, and never applied beside one."""
    with Session(pg_engine) as s:
        ingest(s, [{**BASE, "event_id": "evt-0", "claim_id": "claim-stored"}])
        s.commit()
    with Session(pg_engine) as s, pytest.raises(IntegrityError, match="ck_claim_applied"):
        s.execute(OLDER_RELEASE_LOCK, {"claim": claim})


def test_a_redelivery_during_a_fold_counts_once(pg_engine: Engine) -> None:
    """A batch is redelivered while a fold of its first delivery holds the fold (applied, not
    committed): the redelivery finds every event recorded (duplicates), a second folder finds
    the fold taken and leaves it, and once the fold commits the totals hold the batch once."""
    batch = [version("evt-1", 1, "10.00"), {**event("claim-b", "5.00"), "event_id": "evt-b"}]
    with Session(pg_engine) as s:
        ingest(s, batch)
        s.commit()
    folding = Session(pg_engine)
    try:
        report = fold_round(folding)  # holds the fold lock, not committed
        assert report is not None and (report.batches, report.applied) == (1, 2)
        with Session(pg_engine) as s:
            again = ingest(s, batch)
            s.commit()
        assert (again.duplicate, again.recorded) == (2, 0)
        assert fold_committed(in_session_of(pg_engine)) == FoldReport()  # taken: left to the holder
        folding.commit()
    finally:
        folding.close()
    assert fold_committed(in_session_of(pg_engine)) == FoldReport()  # nothing left
    copay, letters, _ = stored(pg_engine)
    assert (copay, letters) == ([1500], [])  # one key: 10.00 + 5.00, once


def test_a_batch_committed_while_the_fold_is_held_is_folded_by_its_holder(
    pg_engine: Engine,
) -> None:
    """No batch is left behind. A fold round takes the lock and finds nothing; before it
    commits, a batch commits and its own fold finds the lock taken and leaves. The holder looks
    again after its commit and folds that batch (a holder that stopped at "found nothing" would
    leave it unfolded until some later fold)."""
    others: list[FoldReport] = []

    def a_batch_lands_while_held(work: Any) -> Any:
        with Session(pg_engine) as session:
            out = work(session)
            if isinstance(out, FoldReport) and not others:
                with Session(pg_engine) as s:
                    ingest(s, [version("evt-1", 1, "10.00")])
                    s.commit()
                others.append(fold_committed(in_session_of(pg_engine)))
            session.commit()
            return out

    total = fold_committed(a_batch_lands_while_held)
    assert others == [FoldReport()], "the batch's own fold should have found the lock taken"
    assert (total.batches, total.applied) == (1, 1)
    copay, _, _ = stored(pg_engine)
    assert copay == [1000]


def deadlocks(pg_engine: Engine) -> int:
    """Deadlocks Postgres has detected in this database."""
    with pg_engine.connect() as conn:
        sql = "SELECT deadlocks FROM pg_stat_database WHERE datname = current_database()"
        return int(conn.execute(text(sql)).scalar_one())


def test_two_batches_crossing_on_versions_wait_once_and_count_once(
    pg_engine: Engine, pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two batches sending the same two versions under other event ids, in crossed orders, wait
    on each other. The first batch's insert reaches its rows at two moments here (two calls in
    one transaction), as two concurrent inserts interleave. Postgres ends the batch that waited
    first (a deadlock); its transaction rolls back whole and runs again
    (``worker.db.in_transaction``, as a worker runs it), finds the first batch's versions
    committed, and records its own events as duplicates: each version counts once."""
    monkeypatch.setenv("ACCUMSYNC_DATABASE_URL", pg_url)
    get_settings.cache_clear()
    db.reset_engine()
    x = {**BASE, "claim_id": "claim-x", "version": 1, "amounts": {"copay": "10.00"}}
    y = {**BASE, "claim_id": "claim-y", "version": 1, "amounts": {"copay": "20.00"}}
    second_batch = [{**y, "event_id": "evt-b1"}, {**x, "event_id": "evt-b2"}]  # inserted y, x
    before = deadlocks(pg_engine)
    first = Session(pg_engine)
    outcome: dict[str, IngestCounts] = {}
    thread = threading.Thread(target=lambda: outcome.update(second=isolating(second_batch)))
    try:
        ingest(first, [{**x, "event_id": "evt-a1"}])  # holds claim-x's version 1
        thread.start()
        waited = None
        for _ in range(100):  # the second batch holds y and waits for x
            if in_(waited := waiting_in(pg_engine), RECORDING):
                break
            threading.Event().wait(0.05)
        assert in_(waited, RECORDING), f"the second batch waited in {waited!r}"
        ingest(first, [{**y, "event_id": "evt-a2"}])  # waits for y: the two wait on each other
        first.commit()
        thread.join(timeout=30)
        assert not thread.is_alive()
    finally:
        first.close()
        db.engine().dispose()  # the retried batch's connections, closed
        db.reset_engine()
        get_settings.cache_clear()
    assert deadlocks(pg_engine) == before + 1
    second = outcome["second"]
    assert (second.duplicate, second.recorded, second.conflict) == (2, 0, 0)
    folded = fold_committed(in_session_of(pg_engine))
    copay, letters, received = stored(pg_engine)
    assert (folded.applied, copay, letters) == (2, [3000], [])
    with Session(pg_engine) as s:
        holders = s.execute(select(ReceivedEvent.event_id, ReceivedEvent.batch_id)).all()  # type: ignore[call-overload]
    assert sorted(e for e, b in holders if b is not None) == ["evt-a1", "evt-a2"]
    assert len(received) == 4
