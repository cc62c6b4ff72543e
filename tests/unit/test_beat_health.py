"""health's ``beat`` check on a SQLite store: ticks as celery beat records them, judged by the
database's clock; a beat restarted is one beat, two beats ticking together are a mistake."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import update

from worker import db
from worker.ops.health import Check, Limits, beat_check, beat_silence
from worker.schedule import record_tick
from worker.settings import Settings, get_settings
from worker.store.tables import T_BEAT

LIMITS = Limits(900.0, 900.0, beat_silence=5.0)


def judged() -> Check:
    with db.session_scope() as session:
        return beat_check(session, LIMITS)


def ticked(beat: str, first_ago: float, last_ago: float) -> None:
    """A beat's row as if it first ticked ``first_ago`` and last ``last_ago`` seconds ago."""
    record_tick(beat)
    with db.session_scope() as session:
        now = db.clock(session)
        at = {"first_at": now - timedelta(seconds=first_ago)}
        at["last_at"] = now - timedelta(seconds=last_ago)
        session.execute(update(T_BEAT).where(T_BEAT.c.beat == beat).values(**at))


def test_a_store_that_never_saw_a_tick_is_green(store: str) -> None:
    """No beat ever ticked (a fresh store, a test without beat): the other checks judge."""
    check = judged()
    assert (check.ok, check.reason, check.value) == (True, "no beat tick recorded yet", None)


def test_ticks_are_counted_and_the_first_is_kept(store: str) -> None:
    """Every tick moves last_at and the count; first_at stays the first tick's."""
    record_tick("host:1")
    with db.session_scope() as session:
        first = session.execute(T_BEAT.select()).one()
    record_tick("host:1")
    with db.session_scope() as session:
        again = session.execute(T_BEAT.select()).one()
    assert (again.ticks, again.first_at) == (2, first.first_at)
    assert again.last_at >= first.last_at
    check = judged()
    assert check.ok and check.reason.startswith("one beat ticking (host:1), last tick "), check


def test_silent_beat_is_red_naming_the_fix(store: str) -> None:
    """No tick for longer than the limit: red, asking whether celery beat runs."""
    ticked("host:1", 600, 12)
    check = judged()
    assert not check.ok and check.value == pytest.approx(12, abs=1)
    assert check.reason == "no beat tick for 12s; is celery beat running?"


def test_a_restarted_beat_is_one_beat(store: str) -> None:
    """The dead beat's last tick came before the new one's first: one beat, the new one."""
    ticked("host:1", 600, 2)
    ticked("host:2", 1, 0)
    check = judged()
    assert check.ok and check.reason.startswith("one beat ticking (host:2)"), check


def test_two_beats_ticking_together_are_red_by_name(store: str) -> None:
    """Both ticked after the other's first tick, both lately: red, naming both."""
    ticked("host:1", 600, 0)
    ticked("host:2", 30, 0.5)
    check = judged()
    assert not check.ok
    assert check.reason == "2 beats are running: host:1, host:2; run exactly one"


def test_a_stopped_second_beat_stops_counting_after_the_limit(store: str) -> None:
    """Once the second beat's last tick is older than the limit, one beat runs again."""
    ticked("host:1", 600, 0)
    ticked("host:2", 300, 8)
    check = judged()
    assert check.ok and check.reason.startswith("one beat ticking (host:1)"), check


def test_the_limit_is_three_intervals_at_least_five_seconds() -> None:
    """60 s flushes: 180 s of silence; 1 s flushes: 5 s, not 3 (a late tick is not death)."""
    assert beat_silence(Settings(_env_file=None, flush_interval=60)) == 180
    assert beat_silence(Settings(_env_file=None, flush_interval=1)) == 5


def test_a_tick_on_an_unreachable_store_does_not_fail_beat(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An unmigrated store: the tick is not recorded, and beat goes on."""
    monkeypatch.setenv("ACCUMSYNC_DATABASE_URL", f"sqlite:///{tmp_path / 'empty.db'}")
    get_settings.cache_clear()
    db.reset_engine()
    try:
        record_tick("host:1")  # no table: logged, not raised
    finally:
        db.reset_engine()
        get_settings.cache_clear()
