"""one row holds each claim version: a unique index in place of the claim locks

Revision ID: 0017
Revises: 0016
Create Date: 2026-12-05 23:00:00.000000

Up to 0016 an ingest batch took an advisory lock per claim before it inserted its versions, so
that two batches could never both store one ``(claim_id, version)``: a batch waited for every
uncommitted batch sharing a claim with it, even one carrying another version of it. From 0017
the store itself holds a version once: a unique index on ``(claim_id, version)`` over the rows
that carry a version for the fold (``batch_id`` set). A batch inserting a version another
uncommitted batch holds waits on that index entry alone, then skips it (``ON CONFLICT DO
NOTHING``) and decides it against the row committed, as it does for an event id
(worker/ingest/store.py). A second event id for a version received already has no batch, so
is not in the index.

The rows received before 0014 hold their versions with no batch. For each version held by no
row with a batch, its first row (lowest event id) is given a batch of its own, one for all of
them, made here and marked folded (it holds no money: those versions were applied when they
were received). The index is then built; a store holding one version in two rows with a batch,
which no release allowed, stops the upgrade with Postgres's or SQLite's own error naming the
index, and changes nothing.

Upgrading: stop the workers of the earlier release before starting these. An earlier worker
checks for a version by reading the rows committed under its claim locks, which this release
no longer takes (docs/operations.md, "Upgrading").
"""

from collections.abc import Sequence
from datetime import UTC, datetime

import sqlalchemy as sa
import sqlmodel
from alembic import op

revision: str = "0017"
down_revision: str | None = "0016"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

HELD = sa.text("batch_id IS NOT NULL")
UNHELD = """FROM received_event r WHERE r.batch_id IS NULL AND NOT EXISTS (
  SELECT 1 FROM received_event h
  WHERE h.claim_id = r.claim_id AND h.version = r.version AND h.batch_id IS NOT NULL)"""
"""Rows of versions no row with a batch holds: those received before 0014."""
COUNTS = ("received", "applied", "duplicate", "stale", "conflict", "invalid", "duration_ms")
"""The batch's counts (``NOT NULL``): none for the batch made here, which received nothing."""


def upgrade() -> None:
    bind = op.get_bind()
    if bind.execute(sa.text(f"SELECT EXISTS (SELECT 1 {UNHELD})")).scalar_one():
        when = sqlmodel.sql.sqltypes.UTCDateTime()
        batch = sa.table(
            "ingest_batch",
            sa.column("id", sa.BigInteger()),
            sa.column("at", when),
            sa.column("folded_at", when),
            *(sa.column(name, sa.Integer()) for name in COUNTS),
        )
        now = datetime.now(UTC)
        row = {"at": now, "folded_at": now, **dict.fromkeys(COUNTS, 0)}
        made = bind.execute(sa.insert(batch).values(row).returning(batch.c.id))
        bind.execute(
            sa.text(
                "UPDATE received_event SET batch_id = :batch WHERE event_id IN ("
                f"SELECT MIN(r.event_id) {UNHELD} GROUP BY r.claim_id, r.version)"
            ),
            {"batch": made.scalar_one()},
        )
    op.drop_index("ix_received_event_claim_version", table_name="received_event")
    op.create_index(
        "ux_received_event_version",
        "received_event",
        ["claim_id", "version"],
        unique=True,
        postgresql_where=HELD,
        sqlite_where=HELD,
    )


def downgrade() -> None:
    op.drop_index("ux_received_event_version", table_name="received_event")
    op.create_index("ix_received_event_claim_version", "received_event", ["claim_id", "version"])
