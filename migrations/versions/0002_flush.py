"""flush: intents, retries, attempts, plan pushes

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-22 01:54:37.353347
"""

from collections.abc import Sequence

import sqlalchemy as sa
import sqlmodel
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "flush_attempt",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("pair_id", sa.Integer(), nullable=True),
        sa.Column("plan_id", sqlmodel.sql.sqltypes.AutoString(length=64), nullable=True),
        sa.Column("started_at", sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
        sa.Column("duration_ms", sa.Integer(), nullable=False),
        sa.Column("items", sa.Integer(), nullable=False),
        sa.Column("http_status", sa.Integer(), nullable=True),
        sa.Column("statuses", sa.Text(), nullable=False),
        sa.Column("outcome", sqlmodel.sql.sqltypes.AutoString(length=16), nullable=False),
        sa.Column("activity_id", sqlmodel.sql.sqltypes.AutoString(length=128), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("flush_attempt", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_flush_attempt_pair_id"), ["pair_id"], unique=False)
        batch_op.create_index(
            batch_op.f("ix_flush_attempt_started_at"), ["started_at"], unique=False
        )

    op.create_table(
        "plan_push",
        sa.Column("plan_id", sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
        sa.Column("content_hash", sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
        sa.Column("pushed_at", sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("plan_id"),
    )
    with op.batch_alter_table("accumulator", schema=None) as batch_op:
        batch_op.add_column(sa.Column("intent_target", sa.Text(), nullable=True))
        batch_op.add_column(sa.Column("intent_ours", sa.Text(), nullable=True))
        batch_op.add_column(sa.Column("intent_seq", sa.BigInteger(), nullable=True))
        batch_op.add_column(
            sa.Column("intent_at", sqlmodel.sql.sqltypes.UTCDateTime(), nullable=True)
        )
        batch_op.add_column(sa.Column("attempts", sa.Integer(), server_default="0", nullable=False))
        batch_op.add_column(
            sa.Column("next_attempt_at", sqlmodel.sql.sqltypes.UTCDateTime(), nullable=True)
        )
        batch_op.add_column(
            sa.Column("held", sa.Boolean(), server_default=sa.false(), nullable=False)
        )
        batch_op.create_index(
            batch_op.f("ix_accumulator_next_attempt_at"), ["next_attempt_at"], unique=False
        )

    with op.batch_alter_table("pair", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("queued_until", sqlmodel.sql.sqltypes.UTCDateTime(), nullable=True)
        )
        batch_op.add_column(
            sa.Column("last_flush_at", sqlmodel.sql.sqltypes.UTCDateTime(), nullable=True)
        )


def downgrade() -> None:
    with op.batch_alter_table("pair", schema=None) as batch_op:
        batch_op.drop_column("last_flush_at")
        batch_op.drop_column("queued_until")

    with op.batch_alter_table("accumulator", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_accumulator_next_attempt_at"))
        batch_op.drop_column("held")
        batch_op.drop_column("next_attempt_at")
        batch_op.drop_column("attempts")
        batch_op.drop_column("intent_at")
        batch_op.drop_column("intent_seq")
        batch_op.drop_column("intent_ours")
        batch_op.drop_column("intent_target")

    op.drop_table("plan_push")
    with op.batch_alter_table("flush_attempt", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_flush_attempt_started_at"))
        batch_op.drop_index(batch_op.f("ix_flush_attempt_pair_id"))

    op.drop_table("flush_attempt")
