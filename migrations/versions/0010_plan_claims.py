"""plan push claims: fenced by a generation, and the moment an unsettled send may still land

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-03 09:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
import sqlmodel
from alembic import op

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("plan_push", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("claim_gen", sa.BigInteger(), server_default="0", nullable=False)
        )
        batch_op.add_column(
            sa.Column("in_flight_until", sqlmodel.sql.sqltypes.UTCDateTime(), nullable=True)
        )


def downgrade() -> None:
    with op.batch_alter_table("plan_push", schema=None) as batch_op:
        batch_op.drop_column("in_flight_until")
        batch_op.drop_column("claim_gen")
