"""canonical keys: the ledger compares keys as VBA's SQL Server collation does

Ledger keys are now canonical (``models.events.canon``: trailing spaces off, ASCII letters
upper-case): keys that differ only that way are one VBA row, so they must be one accumulator,
not two that overwrite each other's row. Existing claims, pairs and accumulators are rewritten.

Accumulators that become one key are merged: ``ours`` and ``pushed`` summed (in shared
ownership each flush counted the other key's share as VBA's own, so the sums are what VBA
holds) and the key marked dirty, so the next flush rewrites the row (exclusive ownership, where
each overwrote the other, then sends the whole total). Pairs that become one are merged the
same way. A colliding key with a write of unknown outcome, or held by a dead letter, can't be
merged safely: the migration stops, names how many, and says what to do.

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-27 10:00:00
"""

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

KEY = ("subscriber_id", "group_id", "plan_year", "plan_type", "benefit_code")
LOWER, UPPER = "abcdefghijklmnopqrstuvwxyz", "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


def canon(column: str) -> str:
    """SQL for ``models.events.canon`` of a column (SQLite's upper() is ASCII-only already)."""
    if op.get_bind().dialect.name == "postgresql":
        return f"translate(rtrim({column}, ' '), '{LOWER}', '{UPPER}')"
    return f"upper(rtrim({column}, ' '))"


def upgrade() -> None:
    conn = op.get_bind()
    _merge_pairs(conn)
    _merge_accumulators(conn)
    for table, columns in (("claim", KEY), ("accumulator", KEY), ("pair", KEY[:2])):
        sets = ", ".join(f"{c} = {canon(c)}" for c in columns)
        differs = " OR ".join(f"{c} <> {canon(c)}" for c in columns)
        conn.execute(sa.text(f"UPDATE {table} SET {sets} WHERE {differs}"))


def _groups(conn: Any, table: str, columns: Sequence[str]) -> list[list[int]]:
    """Ids of the rows of ``table`` that become one key, per key (lowest id first)."""
    keys = ", ".join(canon(c) for c in columns)
    rows = conn.execute(sa.text(f"SELECT id, {keys} FROM {table} ORDER BY id")).all()
    by_key: dict[tuple[Any, ...], list[int]] = {}
    for row in rows:
        by_key.setdefault(tuple(row[1:]), []).append(int(row[0]))
    return [ids for ids in by_key.values() if len(ids) > 1]


def _merge_pairs(conn: Any) -> None:
    for keep, *others in _groups(conn, "pair", KEY[:2]):
        ids = ", ".join(map(str, others))
        conn.execute(sa.text(f"UPDATE accumulator SET pair_id = {keep} WHERE pair_id IN ({ids})"))
        conn.execute(sa.text(f"DELETE FROM pair WHERE id IN ({ids})"))


def _merge_accumulators(conn: Any) -> None:
    groups = _groups(conn, "accumulator", KEY)
    if not groups:
        return
    every = ", ".join(str(i) for ids in groups for i in ids)
    unsettled = conn.execute(
        sa.text(
            f"SELECT count(*) FROM accumulator WHERE id IN ({every})"
            " AND (intent_target IS NOT NULL OR held)"
        )
    ).scalar_one()
    if unsettled:
        raise RuntimeError(
            f"{unsettled} accumulators whose keys differ only in case or trailing spaces have "
            "a write of unknown outcome or a dead letter: settle them first with the previous "
            "version (`accumsync flush --wait`, `accumsync dead-letters list --source flush`), "
            "then upgrade again"
        )
    cents = [c["name"] for c in sa.inspect(conn).get_columns("accumulator")]
    summed = [c for c in cents if c.endswith(("_total", "_in", "_out"))]
    for ids in groups:
        _merge(conn, ids, summed)


def _merge(conn: Any, ids: list[int], summed: list[str]) -> None:
    keep, others = ids[0], ids[1:]
    listed = ", ".join(map(str, ids))
    sums = ", ".join(f"sum({c})" for c in summed)
    row = conn.execute(
        sa.text(f"SELECT {sums}, max(change_seq) FROM accumulator WHERE id IN ({listed})")
    ).one()
    values: dict[str, Any] = dict(zip(summed, row[: len(summed)], strict=True))
    now = datetime.now(UTC).replace(tzinfo=None)  # UTC, as every timestamp column holds it
    values |= {"change_seq": int(row[-1]) + 1, "dirty_since": now, "attempts": 0}
    sets = ", ".join(f"{c} = :{c}" for c in values)
    conn.execute(sa.text(f"UPDATE accumulator SET {sets} WHERE id = {keep}"), values)
    conn.execute(sa.text(f"DELETE FROM accumulator WHERE id IN ({', '.join(map(str, others))})"))


def downgrade() -> None:
    """Nothing to undo: canonical keys are valid keys of the previous schema too."""
