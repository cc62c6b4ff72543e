"""The audit tables' retention on both stores: old rows go, recent ones stay, and every figure
an operator reads (status, metrics, health's ages) is the same before and after."""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import func, select
from sqlmodel import Session

from models.tables import FlushAttempt, IngestBatch
from worker import db
from worker.ingest.store import IngestCounts, record_batch
from worker.ops.metrics import snapshot
from worker.ops.retention import prune
from worker.schedule import beat_schedule
from worker.settings import Settings, get_settings
from worker.store import counters
from worker.store.tables import T_BATCH

pytestmark = pytest.mark.integration


@pytest.fixture
def store(store_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A migrated store of each kind that ``worker.db`` and the settings point at."""
    monkeypatch.setenv("ACCUMSYNC_DATABASE_URL", store_url)
    monkeypatch.setenv("ACCUMSYNC_HOME", str(tmp_path))
    get_settings.cache_clear()
    db.reset_engine()
    yield store_url
    db.engine().dispose()
    db.reset_engine()
    get_settings.cache_clear()


def audit(session: Session, at: datetime, n: int) -> None:
    """``n`` ingested batches and ``n`` batch calls at ``at``, recorded as the worker does."""
    for _ in range(n):
        counts = IngestCounts(received=3, applied=2, duplicate=1)
        record_batch(session, counts, at, time.monotonic())
        call = FlushAttempt(
            started_at=at, items=2, http_status=207, statuses='{"200": 2}', outcome="ok"
        )
        session.add(call)
        counters.add(session, {"calls.ok.207": 1, "items.200": 2})


def test_old_audit_rows_are_pruned_and_every_figure_stays(store: str) -> None:
    """A 30-day retention: the 25 rows of 40 days ago go, in chunks of 10; the 5
    of today stay; status, metrics and the ages read the same before and after (the counters,
    not the rows, carry them)."""
    now = datetime.now(UTC)
    with db.session_scope() as s:
        audit(s, now - timedelta(days=40), 25)
        audit(s, now - timedelta(minutes=1), 5)
    with db.session_scope() as s:
        before = snapshot(s)
    deleted = prune(Settings(audit_retention_days=30), chunk=10)
    assert deleted == {"ingest_batch": 25, "flush_attempt": 25}
    with db.session_scope() as s:
        after = snapshot(s)
        left = [
            s.execute(select(func.count()).select_from(t)).scalar()
            for t in (IngestBatch, FlushAttempt)
        ]
    assert left == [5, 5]
    assert after["status"]["received"] == before["status"]["received"] == 90
    assert after["calls"] == before["calls"] == {("ok", "207"): 30}
    assert after["items"] == before["items"] == {"200": 60}
    assert after["last_success_age_s"] is not None and after["last_success_age_s"] < 120
    assert prune(Settings(audit_retention_days=0)) == {}  # off: nothing deleted


def test_a_batch_not_folded_is_kept_whatever_its_age(store: str) -> None:
    """A batch whose versions wait for the fold (worker/store/fold.py) is not an audit row yet:
    deleting it would leave its versions to no fold. It stays past the retention."""
    old = datetime.now(UTC) - timedelta(days=40)
    with db.session_scope() as s:
        audit(s, old, 3)
        s.execute(T_BATCH.insert().values(at=old, received=1))  # folded_at NULL
    assert prune(Settings(audit_retention_days=30))["ingest_batch"] == 3
    with db.session_scope() as s:
        kept = s.execute(select(T_BATCH.c.folded_at)).scalars().all()
    assert kept == [None]


def test_beat_prunes_hourly_unless_retention_is_off() -> None:
    """The prune entry is beat's, hourly, with an expiry; 0 days turns it off."""
    entry = beat_schedule(Settings(_env_file=None))["prune"]  # type: ignore[call-arg]
    assert (entry["task"], entry["schedule"], entry["options"]["expires"]) == (
        "accumsync.prune",
        3600.0,
        3600,
    )
    assert "prune" not in beat_schedule(Settings(_env_file=None, audit_retention_days=0))  # type: ignore[call-arg]
