"""record, then fold: a received event carries its claim version; batches are folded later

Revision ID: 0014
Revises: 0013
Create Date: 2026-12-04 18:00:00.000000

Up to 0013 an ingest batch wrote, per event, its received row, its claim's row and its key's
accumulator row, all in the message's transaction. From 0014 ingest writes the received row
only, now holding the whole version (key, network, status, amounts in cents) and the batch it
came in; the fold (worker/store/fold.py) applies the versions of committed batches to claims and
accumulators in a few set statements, one fold at a time.

Every row received before this revision was applied when it was received: ``batch_id`` stays
NULL for them (nothing to fold) and every existing batch is marked folded. The new columns are
nullable or have a constant default, so adding them rewrites nothing on Postgres; the two indexes
are built from tables whose new column is NULL throughout.

Upgrading: stop the workers of the earlier release before starting these. An earlier worker
would apply its batch to claims and totals in its transaction, beside a fold that does the same
without its claim locks (docs/operations.md, "Upgrading").
"""

from collections.abc import Sequence

import sqlalchemy as sa
import sqlmodel
from alembic import op

revision: str = "0014"
down_revision: str | None = "0013"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

AMOUNTS = (
    "allowed",
    "benefit_used",
    "billed",
    "cob",
    "coinsurance",
    "copay",
    "deductible_credit",
    "deductible",
    "not_covered",
    "out_of_pocket",
)
VERSION_COLUMNS = (
    ("status", sa.String(11)),
    ("subscriber_id", sa.String(9)),
    ("group_id", sa.String(20)),
    ("plan_year", sa.String(8)),
    ("plan_type", sa.String(6)),
    ("benefit_code", sa.String(10)),
    ("network", sa.String(3)),
    ("member_seq", sa.String(2)),
    ("service_date", sa.Date()),
    ("adjudicated_at", sqlmodel.sql.sqltypes.UTCDateTime()),
)
UNFOLDED = sa.text("folded_at IS NULL")


def upgrade() -> None:
    bigint = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
    with op.batch_alter_table("received_event") as batch:
        batch.add_column(sa.Column("batch_id", bigint, nullable=True))
        for name, kind in VERSION_COLUMNS:
            batch.add_column(sa.Column(name, kind, nullable=True))
        for amount in AMOUNTS:
            batch.add_column(
                sa.Column(f"{amount}_cents", sa.BigInteger(), nullable=False, server_default="0")
            )
    op.create_index("ix_received_event_batch", "received_event", ["batch_id"])
    with op.batch_alter_table("ingest_batch") as batch:
        batch.add_column(sa.Column("folded_at", sqlmodel.sql.sqltypes.UTCDateTime(), nullable=True))
    op.execute("UPDATE ingest_batch SET folded_at = at")
    op.create_index(
        "ix_ingest_batch_unfolded",
        "ingest_batch",
        ["id"],
        postgresql_where=UNFOLDED,
        sqlite_where=UNFOLDED,
    )


def downgrade() -> None:
    unfolded = op.get_bind().execute(sa.text(f"SELECT count(*) FROM ingest_batch WHERE {UNFOLDED}"))
    if unfolded.scalar_one():
        raise RuntimeError(
            "batches received but not folded yet: run a worker of this release (or "
            "`accumsync flush`) until `accumsync status` shows none unfolded, then downgrade"
        )
    op.drop_index("ix_ingest_batch_unfolded", table_name="ingest_batch")
    with op.batch_alter_table("ingest_batch") as batch:
        batch.drop_column("folded_at")
    op.drop_index("ix_received_event_batch", table_name="received_event")
    with op.batch_alter_table("received_event") as batch:
        for amount in AMOUNTS:
            batch.drop_column(f"{amount}_cents")
        for name, _ in VERSION_COLUMNS:
            batch.drop_column(name)
        batch.drop_column("batch_id")
