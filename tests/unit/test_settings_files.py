"""Secrets from files (ACCUMSYNC_VBA_PASSWORD_FILE, ACCUMSYNC_VBA_API_KEY_FILE): the convention
of Docker and Kubernetes secrets, read once, never printed."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from worker.settings import Settings


def settings(**values: object) -> Settings:
    return Settings(_env_file=None, **values)  # type: ignore[arg-type]


def test_each_secret_comes_from_its_file(tmp_path: Path) -> None:
    (tmp_path / "pw").write_text("s3cret pass\n")
    (tmp_path / "key").write_text("key-123")
    s = settings(vba_password_file=tmp_path / "pw", vba_api_key_file=tmp_path / "key")
    assert s.vba_password.get_secret_value() == "s3cret pass"  # the final newline dropped
    assert s.vba_api_key.get_secret_value() == "key-123"
    assert "s3cret" not in repr(s) and "key-123" not in str(s)


def test_both_a_value_and_a_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "pw").write_text("a")
    with pytest.raises(ValidationError, match=r"ACCUMSYNC_VBA_PASSWORD and .*_FILE are both set"):
        settings(vba_password="b", vba_password_file=tmp_path / "pw")


def test_a_missing_file_names_the_setting_and_the_path(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match=r"ACCUMSYNC_VBA_API_KEY_FILE: cannot read .*nope"):
        settings(vba_api_key_file=tmp_path / "nope")


def test_from_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "pw").write_text("from-env-file")
    monkeypatch.setenv("ACCUMSYNC_VBA_PASSWORD_FILE", str(tmp_path / "pw"))
    assert settings().vba_password.get_secret_value() == "from-env-file"
