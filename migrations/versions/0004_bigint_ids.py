"""bigint ids: every accumulator upsert draws a sequence value, even when it updates

Postgres evaluates the id default of ``INSERT ... ON CONFLICT DO UPDATE`` before it finds the
conflict, so each upsert of an existing accumulator (one per key per ingested batch) consumes an
``accumulator_id_seq`` value. As a 32-bit integer it would run out after 2.1 billion upserts:
about 6 days at the benchmark's sustained rate, and then every ingest would fail. The same holds
for dead letters (upserted by fingerprint). SQLite's INTEGER PRIMARY KEY is 64-bit already.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-22 07:40:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

WIDENED = (("accumulator", "id"), ("dead_letter", "id"), ("dead_letter", "accumulator_id"))


def upgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    for table, column in WIDENED:
        op.alter_column(table, column, type_=sa.BigInteger(), existing_type=sa.Integer())
    op.execute("ALTER SEQUENCE accumulator_id_seq AS BIGINT")
    op.execute("ALTER SEQUENCE dead_letter_id_seq AS BIGINT")


def downgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    op.execute("ALTER SEQUENCE accumulator_id_seq AS INTEGER")
    op.execute("ALTER SEQUENCE dead_letter_id_seq AS INTEGER")
    for table, column in WIDENED:
        op.alter_column(table, column, type_=sa.Integer(), existing_type=sa.BigInteger())
