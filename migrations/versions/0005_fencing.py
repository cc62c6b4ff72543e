"""fencing: lease generations, the remote value an intent was computed from, held kinds,
durable plan pushes

A flush takes a pair's lease by bumping ``pair.lease_gen`` and makes every later write
conditional on it, so a holder whose lease lapsed can no longer undo a newer one. An intent
records ``intent_before`` (VBA's row as read) so a write of unknown outcome is settled by the
rule landed / not landed / ambiguous. Dead letters say what kind of hold they are and how an
operator resolved it; flush attempts keep the read-to-write window. A plan push is stored
with what remains to send, so a 429 or a 5xx is retried with backoff instead of dropped.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-27 09:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
import sqlmodel
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("pair", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("lease_gen", sa.BigInteger(), server_default="0", nullable=False)
        )
    with op.batch_alter_table("accumulator", schema=None) as batch_op:
        batch_op.add_column(sa.Column("intent_before", sa.Text(), nullable=True))
    with op.batch_alter_table("dead_letter", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("kind", sqlmodel.sql.sqltypes.AutoString(length=16), nullable=True)
        )
        batch_op.add_column(
            sa.Column("resolution", sqlmodel.sql.sqltypes.AutoString(length=16), nullable=True)
        )
    with op.batch_alter_table("flush_attempt", schema=None) as batch_op:
        batch_op.add_column(sa.Column("read_to_put_ms", sa.Integer(), nullable=True))
    with op.batch_alter_table("plan_push", schema=None) as batch_op:
        batch_op.alter_column(
            "pushed_at", existing_type=sqlmodel.sql.sqltypes.UTCDateTime(), nullable=True
        )
        batch_op.add_column(sa.Column("records", sa.Text(), server_default="[]", nullable=False))
        batch_op.add_column(sa.Column("remaining", sa.Text(), server_default="[]", nullable=False))
        batch_op.add_column(
            sa.Column(
                "status",
                sqlmodel.sql.sqltypes.AutoString(length=16),
                server_default="sent",
                nullable=False,
            )
        )
        batch_op.add_column(sa.Column("attempts", sa.Integer(), server_default="0", nullable=False))
        batch_op.add_column(
            sa.Column("next_attempt_at", sqlmodel.sql.sqltypes.UTCDateTime(), nullable=True)
        )
        batch_op.add_column(sa.Column("last_error", sa.Text(), nullable=True))
        batch_op.create_index(
            batch_op.f("ix_plan_push_next_attempt_at"), ["next_attempt_at"], unique=False
        )


def downgrade() -> None:
    op.execute("DELETE FROM plan_push WHERE pushed_at IS NULL")  # never accepted: nothing to keep
    with op.batch_alter_table("plan_push", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_plan_push_next_attempt_at"))
        for column in ("last_error", "next_attempt_at", "attempts", "status", "remaining"):
            batch_op.drop_column(column)
        batch_op.drop_column("records")
        batch_op.alter_column(
            "pushed_at", existing_type=sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False
        )
    with op.batch_alter_table("flush_attempt", schema=None) as batch_op:
        batch_op.drop_column("read_to_put_ms")
    with op.batch_alter_table("dead_letter", schema=None) as batch_op:
        batch_op.drop_column("resolution")
        batch_op.drop_column("kind")
    with op.batch_alter_table("accumulator", schema=None) as batch_op:
        batch_op.drop_column("intent_before")
    with op.batch_alter_table("pair", schema=None) as batch_op:
        batch_op.drop_column("lease_gen")
