"""ids and keys compared byte by byte: COLLATE "C" on Postgres

Revision ID: 0016
Revises: 0015
Create Date: 2026-12-05 18:30:00.000000

The event and claim ids and the five key columns (``received_event``, ``claim``,
``accumulator``) and the pair's subscriber and group are matched, grouped and ordered for locks,
never shown in a language's order; keys are canonical ASCII. Under the database's own collation
every comparison of them (each index lookup and insert, the fold's sorts, windows and joins)
called the C library's ``strcoll``; under ``"C"`` it is a byte comparison. On a database that
collates ``C.UTF-8`` ingest's Postgres time fell about 5% (bench/README.md, finding 22); under
``en_US.UTF-8``, whose ``strcoll`` costs more, by more. Equality is unchanged, so is every
order of ASCII text; text beyond ASCII (an event or claim id) now sorts by code point.

Postgres only: SQLite compares bytes already. The type stays ``VARCHAR(n)``, so no table is
rewritten, but each index on these columns is rebuilt under an exclusive lock: the upgrade
takes as long as building those indexes (15 s for 10 million received events on a 2-core
machine), and the workers wait for it meanwhile (docs/operations.md, "Upgrading"). Behind a
transaction that holds one of the tables longer than ``LOCK_TIMEOUT`` the migration gives up
and changes nothing.
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0016"
down_revision: str | None = "0015"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

KEY = {"subscriber_id": 9, "group_id": 20, "plan_year": 8, "plan_type": 6, "benefit_code": 10}
COLUMNS: dict[str, dict[str, int]] = {
    "received_event": {"event_id": 128, "claim_id": 64, **KEY},
    "claim": {"claim_id": 64, **KEY},
    "pair": {"subscriber_id": 9, "group_id": 20},
    "accumulator": KEY,
}
"""Each table's id and key columns, with their lengths."""


LOCK_TIMEOUT = "10s"
"""How long each ``ALTER`` waits for its table's lock. Behind a long transaction (a reconcile,
an operator's open ``psql``) an ``ALTER`` waiting for its exclusive lock would queue every
ingest, fold and flush behind it; it gives up instead, the whole migration rolls back, and
``accumsync db upgrade`` can run again once that transaction ends."""


def collate(collation: str) -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    op.execute(f"SET LOCAL lock_timeout = '{LOCK_TIMEOUT}'")
    for table, columns in COLUMNS.items():
        changes = ", ".join(
            f'ALTER COLUMN {name} TYPE VARCHAR({length}) COLLATE "{collation}"'
            for name, length in columns.items()
        )
        op.execute(f"ALTER TABLE {table} {changes}")


def upgrade() -> None:
    collate("C")


def downgrade() -> None:
    collate("default")
