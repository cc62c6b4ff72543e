"""an aggregate that sums cents as bigint, for the fold (Postgres)

Revision ID: 0015
Revises: 0014
Create Date: 2026-12-05 12:30:00.000000

Postgres's ``SUM(bigint)`` returns ``numeric``. The fold (worker/store/fold.py) sums each key's
30 columns of cents, so it made 30 ``numeric`` values per key, carried them through two window
functions and cast each back to ``bigint`` for the accumulator: about a tenth of a fold's time
(``EXPLAIN ANALYZE`` of a fold of 3,594 versions, bench/README.md, finding 20).
``accumsync_sum_cents`` adds with ``int8pl``, the ``bigint`` ``+`` itself: the same sum, as a
``bigint``, and a sum past 64 bits is refused with the same error (``bigint out of range``) the
accumulator's column gave the ``numeric`` one, so the fold quarantines it as before. (Only a
fold whose partial sums for one key pass 9.2 * 10^18 cents, about 92,000 claims of the largest
amount on one key in one fold, is refused where the numeric sum would have come back in range.)

Additive: a worker of release 0014 still running keeps folding with ``SUM``. SQLite's ``SUM``
of integers is an integer already; nothing to do there.
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0015"
down_revision: str | None = "0014"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    op.execute("CREATE AGGREGATE accumsync_sum_cents(bigint) (SFUNC = int8pl, STYPE = bigint)")


def downgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    op.execute("DROP AGGREGATE accumsync_sum_cents(bigint)")
