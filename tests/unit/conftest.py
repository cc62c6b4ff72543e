"""Fixtures of the unit tests: a SQLite store of the test's own (no server)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from worker import db
from worker.settings import get_settings


@pytest.fixture
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A migrated SQLite store that ``worker.db`` and the settings point at."""
    url = f"sqlite:///{tmp_path / 'store.db'}"
    db.upgrade(url)
    monkeypatch.setenv("ACCUMSYNC_DATABASE_URL", url)
    monkeypatch.setenv("ACCUMSYNC_HOME", str(tmp_path))
    get_settings.cache_clear()
    db.reset_engine()
    yield url
    db.reset_engine()
    get_settings.cache_clear()
