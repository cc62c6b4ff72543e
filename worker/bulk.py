"""Many rows in one statement: one round trip per batch, whatever its size.

On Postgres the rows travel as one JSON parameter and come back out of
``json_populate_recordset(NULL::table, :rows)`` as a table typed by the target's own columns
(``INSERT ... SELECT ... FROM json_populate_recordset(...)``). A batch of 500 rows is then one
statement of constant shape: compiled once per process, prepared once per connection, executed
once per batch. psycopg's ``executemany`` runs a statement once per row, and the server's
per-statement cost made that the ingest's bottleneck; one typed array per column (``unnest``)
fixed that but moved the cost into psycopg's per-element array quoting, in Python. JSON is
encoded in C and parsed once by the server. (The profiles are in the README's Performance
section.)

SQLite runs in-process, where a statement per row costs little: it keeps ``executemany``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from datetime import date, datetime
from typing import Any, cast

from sqlalchemy import JSON, Executable, Table, Text, bindparam, func, literal_column, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.sql.elements import ColumnClause
from sqlalchemy.sql.selectable import TableValuedAlias
from sqlmodel import Session

Rows = Sequence[Mapping[str, Any]]
Changes = Callable[[Any, Any], Mapping[str, Any]]
"""An upsert's update: (stored columns, excluded columns) -> column name -> new value."""


def is_postgres(session: Session) -> bool:
    return session.get_bind().dialect.name == "postgresql"


def insert(session: Session, table: Table) -> postgresql.Insert:
    """The dialect's INSERT, which knows ON CONFLICT (SQLite's has the same API as Postgres')."""
    if is_postgres(session):
        return postgresql.insert(table)
    return cast(postgresql.Insert, sqlite.insert(table))


def recordset(table: Table) -> TableValuedAlias:
    """``json_populate_recordset(NULL::table, :rows) AS rows``: the bound rows as a table."""
    rowtype: ColumnClause[Any] = literal_column(f"NULL::{table.name}")
    rows = bindparam("rows", type_=Text).cast(JSON)
    return func.json_populate_recordset(rowtype, rows).table_valued(*table.c.keys()).alias("rows")


def as_json(rows: Rows) -> str:
    """The rows as one JSON array, timestamps and dates in ISO 8601 (timestamps must be aware)."""
    return json.dumps(rows, default=_iso, separators=(",", ":"))


def _iso(value: Any) -> str:
    if isinstance(value, datetime) and value.utcoffset() is None:
        raise ValueError("timestamps must be timezone-aware (UTC)")
    if isinstance(value, date):
        return value.isoformat()
    raise TypeError(f"cannot store a {type(value).__name__} in a bulk row")


def upsert(
    session: Session,
    table: Table,
    rows: Rows,
    *,
    conflict: Sequence[str],
    set_: Changes | None = None,
    order_by: Sequence[str] = (),
    returning: bool = False,
) -> Sequence[Any]:
    """Insert ``rows``; on a ``conflict`` key, update the stored row with ``set_``, or skip it.

    ``set_(stored, new)`` gets the table's columns and the conflicting new row's (``excluded``)
    and returns the changes, column name -> expression.
    ``order_by`` fixes the order rows are inserted (and their row locks taken) on Postgres;
    on SQLite rows go in the order given. With ``returning``, the stored rows come back.
    """
    if not rows:
        return []
    names = list(rows[0])
    stmt = insert(session, table)
    if is_postgres(session):
        source = recordset(table)
        query = select(*[source.c[n] for n in names]).order_by(*[source.c[n] for n in order_by])
        stmt = stmt.from_select(names, query)
    changes = set_(table.c, stmt.excluded) if set_ else {}
    final: Executable = (
        stmt.on_conflict_do_update(index_elements=list(conflict), set_=changes)
        if changes
        else stmt.on_conflict_do_nothing(index_elements=list(conflict))
    )
    if returning:
        final = cast(postgresql.Insert, final).returning(table)
    if is_postgres(session):
        result = session.execute(final, {"rows": as_json(rows)})
    else:
        result = session.execute(final, list(rows))
    return result.mappings().all() if returning else []
