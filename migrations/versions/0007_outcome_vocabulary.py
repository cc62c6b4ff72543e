"""outcome vocabulary: ingest_batch's columns spelled as models.ledger.Kind

``events``, ``duplicates`` and ``conflicts`` become ``received``, ``duplicate`` and
``conflict``: one word per outcome, from the batch result to status, metrics and logs.

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-27 11:00:00
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

RENAMED = (("events", "received"), ("duplicates", "duplicate"), ("conflicts", "conflict"))


def upgrade() -> None:
    with op.batch_alter_table("ingest_batch", schema=None) as batch_op:
        for old, new in RENAMED:
            batch_op.alter_column(old, new_column_name=new)


def downgrade() -> None:
    with op.batch_alter_table("ingest_batch", schema=None) as batch_op:
        for old, new in RENAMED:
            batch_op.alter_column(new, new_column_name=old)
