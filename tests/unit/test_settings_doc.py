"""docs/configuration.md is generated from the settings' descriptions and kept current, as
schemas/claim_event.v1.json is kept for ClaimEvent; ACCUMSYNC_INGEST_BATCH_SIZE, which it lists,
is read by the producer."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import Field

from worker.settings import Settings
from worker.settings_doc import markdown, row

ROOT = Path(__file__).resolve().parents[2]
FILE = ROOT / "docs/configuration.md"


def test_the_file_is_the_settings_reference() -> None:
    """The committed file is what the generator prints now."""
    stale = "stale: run `python -m worker.settings_doc > docs/configuration.md`"
    assert FILE.read_text(encoding="utf-8") == markdown(), stale


def test_every_setting_is_listed_with_its_default() -> None:
    """One row per field, named as the environment spells it, defaults as a reader sees them."""
    text = FILE.read_text(encoding="utf-8")
    for name in Settings.model_fields:
        assert f"| `ACCUMSYNC_{name.upper()}` |" in text, name
    assert "| `ACCUMSYNC_HOME` | ~/.accumsync |" in text  # not this machine's home
    assert "| `ACCUMSYNC_VBA_TIMEOUT` | 30 |" in text
    assert "| `ACCUMSYNC_VBA_VERIFY_TLS` | `true` |" in text


def test_a_setting_without_a_description_stops_the_generator() -> None:
    """The check can fail: an undescribed field is named, not printed as an empty row."""

    class Loose(Settings):
        undescribed: int = 3
        described: int = Field(default=4, description="four | five")

    with pytest.raises(ValueError, match="undescribed has no Field"):
        row("undescribed", Loose.model_fields["undescribed"])
    assert row("described", Loose.model_fields["described"]) == (
        "| `ACCUMSYNC_DESCRIBED` | 4 | four \\| five |"
    )


def test_publish_sends_messages_of_the_configured_batch_size(tmp_path: Path) -> None:
    """``accumsync publish`` without ``--batch-size`` sends ACCUMSYNC_INGEST_BATCH_SIZE events per
    message (here onto the embedded broker, no service needed): 20 events in 7s are 3 messages."""
    events = tmp_path / "events.jsonl"
    events.write_text("".join(json.dumps({"event_id": f"e-{i}"}) + "\n" for i in range(20)))
    env = {k: v for k, v in os.environ.items() if not k.startswith("ACCUMSYNC_")}
    env |= {"ACCUMSYNC_HOME": str(tmp_path / "home"), "ACCUMSYNC_INGEST_BATCH_SIZE": "7"}
    cli = Path(sys.executable).with_name("accumsync")
    proc = subprocess.run(
        [str(cli), "publish", str(events)],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert "published 20 events in batches of 7" in proc.stdout
    with sqlite3.connect(tmp_path / "home" / "broker.db") as db:
        assert db.execute("SELECT count(*) FROM kombu_message").fetchone() == (3,)
