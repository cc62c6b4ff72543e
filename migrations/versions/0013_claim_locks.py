"""claim locks: no placeholder rows; a claim row holds an applied version

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-04 13:10:00.000000

Up to 0012 an ingest batch locked its claims by rewriting their rows (an upsert whose row
carried a placeholder version, -1, the row kept as a placeholder for a claim not stored yet).
From 0013 it takes a transaction-scoped advisory lock per claim and writes each claim row once.
The two locks would not exclude each other: during a rolling upgrade an older worker and a newer
one could apply versions of one claim at once. So on Postgres this revision forbids the
placeholder (``version >= 0``): every batch of an older worker is refused by the store
(``CheckViolation``), which that worker takes for a database error and retries, until a newer
worker takes the message. Nothing is lost and nothing applied twice; older workers only stop
being useful for ingest once this runs (flushes are unaffected).

The constraint is added ``NOT VALID`` and validated separately, so the scan of the table does
not block writes. The placeholder rows left by batches whose every event was refused hold
nothing (no received event, no money) and are deleted first. SQLite has one writer at a time,
whatever the release: nothing to change there.
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0013"
down_revision: str | None = "0012"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

CONSTRAINT = "ck_claim_applied"


def upgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    op.execute("DELETE FROM claim WHERE version < 0")
    op.execute(f"ALTER TABLE claim ADD CONSTRAINT {CONSTRAINT} CHECK (version >= 0) NOT VALID")
    op.execute(f"ALTER TABLE claim VALIDATE CONSTRAINT {CONSTRAINT}")


def downgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    op.execute(f"ALTER TABLE claim DROP CONSTRAINT {CONSTRAINT}")
