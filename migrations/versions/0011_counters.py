"""counters: ingest outcomes, batch calls and 207 item statuses kept as counters, backfilled from
the audit tables, which a retention job now prunes

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-03 11:30:00.000000
"""

import json
from collections import Counter
from collections.abc import Sequence
from datetime import UTC, datetime

import sqlalchemy as sa
from alembic import op

revision: str = "0011"
down_revision: str | None = "0010"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

OUTCOMES = ("received", "applied", "duplicate", "stale", "conflict", "invalid")
COUNTED = ("events.", "calls.", "items.")


def upgrade() -> None:
    """Each counter starts at what the audit tables hold (shard 0), so totals go on."""
    conn = op.get_bind()
    counts: Counter[str] = Counter()
    last: dict[str, datetime] = {}
    sums = ", ".join(f"COALESCE(SUM({o}), 0)" for o in OUTCOMES)
    row = conn.execute(sa.text(f"SELECT {sums}, MAX(at) FROM ingest_batch")).one()
    for outcome, n in zip(OUTCOMES, row, strict=False):
        counts[f"events.{outcome}"] += int(n)
        last[f"events.{outcome}"] = row[-1]
    calls = "SELECT outcome, http_status, statuses, COUNT(*), MAX(started_at) FROM flush_attempt"
    for outcome, http, statuses, n, at in conn.execute(sa.text(calls + " GROUP BY 1, 2, 3")):
        name = f"calls.{outcome}.{'none' if http is None else http}"
        counts[name] += int(n)
        last[name] = max(filter(None, (last.get(name), at)), default=at)
        for status, k in json.loads(statuses or "{}").items():
            counts[f"items.{status}"] += int(k) * int(n)
            last[f"items.{status}"] = max(filter(None, (last.get(f"items.{status}"), at)))
    now = datetime.now(UTC)
    table = sa.table(
        "event_counter", sa.column("name"), sa.column("value"), sa.column("updated_at")
    )
    rows = [
        {"name": f"{name}@0", "value": n, "updated_at": last.get(name) or now}
        for name, n in sorted(counts.items())
        if n
    ]
    if rows:
        op.bulk_insert(table, rows)


def downgrade() -> None:
    for prefix in COUNTED:
        op.execute(sa.text(f"DELETE FROM event_counter WHERE name LIKE '{prefix}%'"))
