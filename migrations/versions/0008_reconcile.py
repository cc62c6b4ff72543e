"""reconcile: runs with their cursor, and the keys each found not equal

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-27 12:10:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
import sqlmodel
from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

BIGINT_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "reconcile_run",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("scope", sqlmodel.sql.sqltypes.AutoString(length=200), nullable=False),
        sa.Column("scope_hash", sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
        sa.Column("ownership", sqlmodel.sql.sqltypes.AutoString(length=16), nullable=False),
        sa.Column("repair", sa.Boolean(), nullable=False),
        sa.Column("started_at", sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
        sa.Column("updated_at", sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
        sa.Column("finished_at", sqlmodel.sql.sqltypes.UTCDateTime(), nullable=True),
        sa.Column("last_pair_id", sa.Integer(), nullable=False),
        sa.Column("pairs_done", sa.Integer(), nullable=False),
        sa.Column("keys_checked", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_reconcile_run_scope_hash", "reconcile_run", ["scope_hash"])
    op.create_table(
        "reconcile_finding",
        sa.Column("id", BIGINT_ID, nullable=False),
        sa.Column("run_id", sa.Integer(), nullable=False),
        sa.Column("accumulator_id", BIGINT_ID, nullable=False),
        sa.Column("finding", sqlmodel.sql.sqltypes.AutoString(length=16), nullable=False),
        sa.Column("fields", sa.Text(), nullable=False),
        sa.Column("repaired", sa.Boolean(), nullable=False),
        sa.ForeignKeyConstraint(["run_id"], ["reconcile_run.id"]),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_reconcile_finding_run_id", "reconcile_finding", ["run_id"])


def downgrade() -> None:
    op.drop_index("ix_reconcile_finding_run_id", "reconcile_finding")
    op.drop_table("reconcile_finding")
    op.drop_index("ix_reconcile_run_scope_hash", "reconcile_run")
    op.drop_table("reconcile_run")
