"""The schema guard's decision: a process runs only on a store at exactly its own head; behind it
names ``accumsync db upgrade``, a revision it does not know names the newer release to upgrade to.
"""

from __future__ import annotations

from alembic.script import ScriptDirectory

from worker.db import (
    MIGRATIONS,
    NotMigrated,
    SchemaTooNew,
    known_revisions,
    schema_mismatch,
)

KNOWN = ["0001", "0002", "0003"]


def test_a_store_at_the_code_head_passes() -> None:
    """Store and code agree: nothing to say."""
    assert schema_mismatch(["0003"], KNOWN) is None


def test_a_store_behind_the_head_names_the_upgrade_command() -> None:
    """A known revision older than the head: migrate first."""
    problem = schema_mismatch(["0002"], KNOWN)
    assert isinstance(problem, NotMigrated)
    assert str(problem) == (
        "database schema is at 0002, expected 0003: run `accumsync db upgrade` "
        "(same ACCUMSYNC_DATABASE_URL) before starting workers"
    )


def test_an_empty_store_names_the_upgrade_command() -> None:
    """No version row at all (a fresh database) is behind every head."""
    problem = schema_mismatch([], KNOWN)
    assert isinstance(problem, NotMigrated)
    assert "database schema is at nothing, expected 0003" in str(problem)


def test_a_revision_the_code_does_not_know_is_a_newer_schema() -> None:
    """The store was migrated by a newer release: this code must not touch it, and the line
    names both revisions and the fix (never `db upgrade`, which can't go forward from here)."""
    problem = schema_mismatch(["0004_audit"], KNOWN)
    assert isinstance(problem, SchemaTooNew)
    assert str(problem) == (
        "this accumsync knows schema up to 0003; the store is at 0004_audit, written by a "
        "newer accumsync: upgrade this worker to the release that migrated it"
    )
    assert "\n" not in str(problem) and "db upgrade" not in str(problem)


def test_an_unknown_head_among_several_is_still_newer() -> None:
    """Branched heads in the store: any unknown one means a newer schema, whatever the rest."""
    assert isinstance(schema_mismatch(["0003", "0004_x"], KNOWN), SchemaTooNew)
    assert isinstance(schema_mismatch(["0002", "0003"], KNOWN), NotMigrated)


def test_the_packaged_migrations_are_listed_oldest_first_up_to_the_head() -> None:
    """The known list the guard reads from the files is alembic's chain of them, head last."""
    script = ScriptDirectory(str(MIGRATIONS))
    known = known_revisions()
    assert known[0] == "0001" and known[-1] == script.get_current_head()
    assert list(known) == [r.revision for r in reversed(list(script.walk_revisions()))]
