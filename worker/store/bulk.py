"""Many rows in one statement: one round trip per batch, whatever its size.

On Postgres the rows travel as one JSON parameter and come back out of
``json_populate_recordset(NULL::table, :rows)`` as a table typed by the target's own columns
(``INSERT ... SELECT ... FROM json_populate_recordset(...)``). A batch of 500 rows is then one
statement of constant shape: compiled once per process, prepared once per connection, executed
once per batch. psycopg's ``executemany`` runs a statement once per row, and the server's
per-statement cost made that the ingest's bottleneck; one typed array per column (``unnest``)
fixed that but moved the cost into psycopg's per-element array quoting, in Python. JSON is
encoded in C and parsed once by the server. (The profiles are in bench/README.md,
"Figures".)

SQLite runs in-process, where a statement per row costs little: it keeps ``executemany``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from functools import lru_cache
from typing import Any, NamedTuple, cast

from pydantic_core import to_json
from sqlalchemy import (
    JSON,
    ColumnElement,
    Executable,
    Select,
    Table,
    Text,
    bindparam,
    func,
    literal,
    literal_column,
    select,
    true,
)
from sqlalchemy import update as sa_update
from sqlalchemy.dialects import postgresql
from sqlalchemy.sql.elements import ColumnClause
from sqlalchemy.sql.selectable import TableValuedAlias
from sqlmodel import Session

from worker.db import dialect_insert, is_postgres

Rows = Sequence[Mapping[str, Any]]
Changes = Callable[[Any, Any], Mapping[str, Any]]
"""An upsert's update: (stored columns, excluded columns) -> column name -> new value."""


def recordset(table: Table) -> TableValuedAlias:
    """``json_populate_recordset(NULL::table, :rows) AS rows``: the bound rows as a table."""
    rowtype: ColumnClause[Any] = literal_column(f"NULL::{table.name}")
    rows = bindparam("rows", type_=Text).cast(JSON)
    return func.json_populate_recordset(rowtype, rows).table_valued(*table.c.keys()).alias("rows")


def filled(
    rows: TableValuedAlias, table: Table, names: Sequence[str], fill: Mapping[str, Any]
) -> list[ColumnElement[Any]]:
    """The recordset's ``names`` columns, each in ``fill`` defaulting to its value there (so a
    sparse row carries only what it sets)."""
    return [
        func.coalesce(rows.c[n], literal(fill[n], table.c[n].type)) if n in fill else rows.c[n]
        for n in names
    ]


def as_json(rows: Rows) -> str:
    """The rows as one JSON array, timestamps and dates in ISO 8601 (pydantic-core's encoder,
    4x the standard library's here). Timestamps must be aware: every one written is either
    ``utcnow()`` or a validated ClaimEvent's ``AwareDatetime``."""
    return to_json(rows).decode()


def rows_where_in(
    session: Session,
    columns: Sequence[ColumnElement[Any]],
    key: ColumnElement[Any],
    values: Any,
    *also: ColumnElement[bool],
) -> Select[Any]:
    """``SELECT columns WHERE key IN (values) AND also...``, the values bound as one JSON array
    (``also``: conditions on the row, such as a partial index's own).

    One parameter whatever the count, so the statement text never changes and Postgres
    prepares it once (an ``IN (:v1, ..., :vN)`` list is a new statement for every N). On
    Postgres each value is looked up by ``key``'s index (``CROSS JOIN LATERAL``): a plain
    semi-join left the choice to table statistics, which lag behind a fast-growing table and
    picked a full scan of it per batch.
    """
    array = bindparam(None, json.dumps(list(values)), type_=Text)
    if not is_postgres(session):
        each = func.json_each(array).table_valued("value")
        return select(*columns).where(key.in_(select(each.c.value)), *also)
    wanted = func.json_array_elements_text(array.cast(JSON)).table_valued("value").alias("v")
    # OFFSET 0 keeps the planner from flattening the lateral subquery into that semi-join.
    found = select(*columns).where(key == wanted.c.value, *also).offset(0).lateral("found")
    return select(*found.c).select_from(wanted).join(found, true())


def upsert(
    session: Session,
    table: Table,
    rows: Rows,
    *,
    conflict: Sequence[str],
    set_: Changes | None = None,
    order_by: Sequence[str] = (),
    returning: Sequence[str] = (),
    columns: Sequence[str] | None = None,
    fill: Mapping[str, Any] | None = None,
    same: Mapping[str, Any] | None = None,
) -> Sequence[Any]:
    """Insert ``rows``; on a ``conflict`` key, update the stored row with ``set_``, or skip it.

    ``set_(stored, new)`` gets the table's columns and the conflicting new row's (``excluded``)
    and returns the changes, column name -> expression. ``columns`` are the columns written
    (default: the first row's keys); a row may leave out those in ``fill``, which gives their
    value (so a sparse row carries only what it changes); ``same`` holds values every row shares,
    bound once per statement instead of once per row. ``order_by`` fixes the order rows are
    inserted (and their row locks taken) on Postgres; on SQLite rows go in the order given.
    ``returning`` names the columns of the stored rows that come back (only those: every
    column returned is converted for every row, a timestamp's conversion above all).
    """
    if not rows:
        return []
    names = tuple(columns or rows[0])
    fill, same = fill or {}, dict(same or {})
    postgres = is_postgres(session)
    shape = Shape(
        table,
        postgres,
        names,
        tuple(fill.items()),
        tuple(same),
        tuple(conflict),
        set_,
        tuple(order_by),
        tuple(returning),
    )
    stmt = statement(shape)
    if postgres:
        params = {"rows": as_json(rows)} | {f"same_{k}": v for k, v in same.items()}
        result = session.execute(stmt, params)
    else:
        dense = [{n: r.get(n, fill.get(n)) for n in names} | same for r in rows]
        result = session.execute(stmt, dense)
    return result.mappings().all() if returning else []


class Shape(NamedTuple):
    """Everything an upsert statement depends on: statements are built once per shape."""

    table: Table
    postgres: bool
    names: tuple[str, ...]
    fill: tuple[tuple[str, Any], ...]
    same: tuple[str, ...]
    conflict: tuple[str, ...]
    set_: Changes | None
    order_by: tuple[str, ...]
    returning: tuple[str, ...]


@lru_cache(maxsize=64)
def statement(shape: Shape) -> Executable:
    """The upsert statement of ``shape``, built once per process.

    Bounded: a caller passing a new ``set_`` function per call (a lambda) would otherwise grow
    the cache with every batch (the memory benchmark caught exactly that: +230 MB over 1M events).
    """
    table, fill = shape.table, dict(shape.fill)
    stmt = dialect_insert(table, shape.postgres)
    if shape.postgres:
        rows = recordset(table)
        values = filled(rows, table, shape.names, fill)
        values += [bindparam(f"same_{n}", type_=table.c[n].type) for n in shape.same]
        query = select(*values).order_by(*[rows.c[n] for n in shape.order_by])
        stmt = stmt.from_select([*shape.names, *shape.same], query)
    changes = shape.set_(table.c, stmt.excluded) if shape.set_ else {}
    final: Executable = (
        stmt.on_conflict_do_update(index_elements=list(shape.conflict), set_=changes)
        if changes
        else stmt.on_conflict_do_nothing(index_elements=list(shape.conflict))
    )
    if shape.returning:
        final = cast(postgresql.Insert, final).returning(*[table.c[n] for n in shape.returning])
    return final


def update_rows(
    session: Session,
    table: Table,
    rows: Rows,
    *,
    match: Sequence[str],
    constant: Mapping[str, Any] | None = None,
) -> None:
    """Update many rows in one statement: each row names its ``match`` columns' values and the
    values to set; ``constant`` sets the same value on every matched row. Every row carries the
    same columns (callers group them by shape).

    Postgres: ``UPDATE table SET c = rows.c FROM json_populate_recordset(...) AS rows WHERE
    table.key = rows.key``, one round trip whatever the count; SQLite: ``executemany``.
    """
    if not rows:
        return
    names = tuple(rows[0])
    shape = UpdateShape(table, is_postgres(session), names, tuple(match), tuple(constant or {}))
    stmt = update_statement(shape)
    params = {f"same_{k}": v for k, v in (constant or {}).items()}
    if shape.postgres:
        session.execute(stmt, {"rows": as_json(rows)} | params)
    else:
        session.execute(stmt, [{f"b_{k}": v for k, v in r.items()} | params for r in rows])


class UpdateShape(NamedTuple):
    """Everything an update statement depends on: statements are built once per shape."""

    table: Table
    postgres: bool
    names: tuple[str, ...]
    match: tuple[str, ...]
    constant: tuple[str, ...]


@lru_cache(maxsize=64)
def update_statement(shape: UpdateShape) -> Executable:
    """The update statement of ``shape``, built once per process."""
    table = shape.table
    changed = [n for n in shape.names if n not in shape.match]
    values: dict[str, ColumnElement[Any]] = {
        n: bindparam(f"same_{n}", type_=table.c[n].type) for n in shape.constant
    }
    if shape.postgres:
        rows = recordset(table)
        values |= {n: rows.c[n] for n in changed}
        return (
            sa_update(table).where(*[table.c[n] == rows.c[n] for n in shape.match]).values(values)
        )
    values |= {n: bindparam(f"b_{n}", type_=table.c[n].type) for n in changed}
    matched = [table.c[n] == bindparam(f"b_{n}") for n in shape.match]
    return sa_update(table).where(*matched).values(values)
