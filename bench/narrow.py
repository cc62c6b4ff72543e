"""What splitting the accumulator row would buy (issue 24's item 5): the fold's writes on the
70-column ``accumulator`` row against the 30 "ours" columns in a narrow table of their own.

``python -m bench.narrow [--keys 100000] [--rounds 300] [--batch 300]`` fills a fresh, migrated
Postgres database with ``--keys`` accumulators (and, beside them, a table ``ours`` holding only
their id, the 30 amounts, ``change_seq``, ``dirty_since`` and ``updated_at``), then runs
``--rounds`` rounds of ``--batch`` keys each with six amounts changed, as a fold does. Each round
is applied both ways, in alternating order, one transaction each, with the product's planner
settings (``BY_INDEX``):

- wide: ``UPDATE accumulator`` by key (what the fold runs now);
- narrow: ``UPDATE ours`` by the id found through the accumulator's key index.

Then the other side of the split, new keys: ``--batch`` new accumulators per round inserted as
one row (now) and as the row plus its ``ours`` row (split), alternately. Baseline: the wide forms
(narrow / wide, medians per row). Nothing of the product runs here but its schema: the figures
bound what the split could give before anyone builds it (bench/README.md, finding 15).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from typing import Any

import psycopg
from sqlalchemy.engine import make_url

from bench.common import Report, Run
from models.buckets import COLUMNS
from worker.store.fold import BY_INDEX

KEYS = ("subscriber_id", "group_id", "plan_year", "plan_type", "benefit_code")
AMOUNTS = ", ".join(COLUMNS)
ZEROS = ", ".join("0" for _ in COLUMNS)
PUSHED = ", ".join(f"pushed_{c}" for c in COLUMNS)
ROWTYPE = ", ".join([f"{k} text" for k in KEYS] + [f"{c} bigint" for c in COLUMNS])
DELTAS = f"SELECT * FROM json_to_recordset(%(rows)s::json) AS d({ROWTYPE})"
SAME_KEY = " AND ".join(f"a.{k} = d.{k}" for k in KEYS)

WIDE_UPDATE = f"""WITH d AS ({DELTAS})
UPDATE accumulator a SET {", ".join(f"{c} = a.{c} + d.{c}" for c in COLUMNS)},
  change_seq = a.change_seq + 1, dirty_since = COALESCE(a.dirty_since, now()), updated_at = now()
FROM d WHERE {SAME_KEY}"""

NARROW_UPDATE = f"""WITH d AS ({DELTAS})
UPDATE ours o SET {", ".join(f"{c} = o.{c} + d.{c}" for c in COLUMNS)},
  change_seq = o.change_seq + 1, dirty_since = COALESCE(o.dirty_since, now()), updated_at = now()
FROM d JOIN accumulator a ON {SAME_KEY} WHERE o.id = a.id"""

WIDE_INSERT = f"""WITH d AS ({DELTAS})
INSERT INTO accumulator (pair_id, {", ".join(KEYS)}, change_seq, pushed_seq, attempts, held,
  dirty_since, updated_at, {AMOUNTS}, {PUSHED})
SELECT 1, {", ".join(f"d.{k}" for k in KEYS)}, 1, 0, 0, false, now(), now(),
  {", ".join(f"d.{c}" for c in COLUMNS)}, {ZEROS} FROM d"""

SPLIT_INSERT = f"""WITH d AS ({DELTAS}), made AS (
INSERT INTO accumulator (pair_id, {", ".join(KEYS)}, change_seq, pushed_seq, attempts, held,
  dirty_since, updated_at, {AMOUNTS}, {PUSHED})
SELECT 1, {", ".join(f"d.{k}" for k in KEYS)}, 1, 0, 0, false, now(), now(), {ZEROS}, {ZEROS}
FROM d RETURNING id, {", ".join(KEYS)})
INSERT INTO ours (id, {AMOUNTS}, change_seq, dirty_since, updated_at)
SELECT m.id, {", ".join(f"d.{c}" for c in COLUMNS)}, 1, now(), now()
FROM made m JOIN d ON {SAME_KEY.replace("a.", "m.")}"""


def conninfo(url: str) -> str:
    """A SQLAlchemy URL (``postgresql+psycopg://...``) as psycopg takes it."""
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


def key_of(i: int) -> dict[str, str]:
    """Key ``i``: five benefits per subscriber, one group."""
    return {
        "subscriber_id": f"S{1 + i // 5:08d}",
        "group_id": "G1",
        "plan_year": "2026",
        "plan_type": "MED",
        "benefit_code": f"B{i % 5}",
    }


def deltas(keys: list[int], rng: random.Random) -> str:
    """A fold's deltas for ``keys``: six amounts changed on each."""
    rows = []
    for i in keys:
        row: dict[str, Any] = key_of(i) | {c: 0 for c in COLUMNS}
        for column in rng.sample(COLUMNS, 6):
            row[column] = rng.randint(1, 5_000)
        rows.append(row)
    return json.dumps(rows)


def fill(conn: psycopg.Connection[Any], keys: int) -> None:
    """``keys`` accumulators at zero, their pairs, and the narrow table beside them."""
    subscriber = "'S' || lpad((1 + (i - 1) / 5)::text, 8, '0')"
    with conn.transaction():
        conn.execute(
            f"INSERT INTO pair (id, subscriber_id, group_id, attempts, lease_gen) "
            f"SELECT i, 'S' || lpad(i::text, 8, '0'), 'G1', 0, 0 "
            f"FROM generate_series(1, {keys // 5 + 1}) i"
        )
        conn.execute(
            f"INSERT INTO accumulator (pair_id, {', '.join(KEYS)}, change_seq, pushed_seq, "
            f"attempts, held, {AMOUNTS}, {PUSHED}) "
            f"SELECT 1 + (i - 1) / 5, {subscriber}, 'G1', '2026', 'MED', 'B' || ((i - 1) % 5), "
            f"0, 0, 0, false, {ZEROS}, {ZEROS} FROM generate_series(1, {keys}) i"
        )
        amounts = ", ".join(f"{c} bigint NOT NULL" for c in COLUMNS)
        conn.execute(
            f"CREATE TABLE ours (id bigint PRIMARY KEY, {amounts}, change_seq bigint NOT NULL, "
            "dirty_since timestamptz, updated_at timestamptz)"
        )
        conn.execute("CREATE INDEX ours_dirty_since ON ours (dirty_since)")
        conn.execute(
            f"INSERT INTO ours (id, {AMOUNTS}, change_seq) SELECT id, {AMOUNTS}, 0 FROM accumulator"
        )
    conn.execute("ANALYZE")
    conn.commit()


def timed(conn: psycopg.Connection[Any], sql: str, rows: str) -> float:
    """One statement in a transaction of its own: microseconds per row it wrote."""
    started = time.perf_counter()
    with conn.transaction():
        conn.execute(str(BY_INDEX))  # the fold's planner settings, for the transaction
        written = conn.execute(sql, {"rows": rows}).rowcount
    return (time.perf_counter() - started) * 1e6 / max(1, written)


def alternate(
    conn: psycopg.Connection[Any], ways: dict[str, str], rounds: list[tuple[str, str]]
) -> dict[str, list[float]]:
    """Round by round, each way writes its rows of the round, the order swapped every round."""
    spent: dict[str, list[float]] = {name: [] for name in ways}
    for n, rows in enumerate(rounds):
        order = list(zip(ways.items(), rows, strict=True))
        for (name, sql), its_rows in order if n % 2 else reversed(order):
            spent[name].append(timed(conn, sql, its_rows))
    return spent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--keys", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=300)
    parser.add_argument("--batch", type=int, default=300)
    args = parser.parse_args()
    report = Report("narrow", vars(args))
    rng = random.Random(1)
    with Run("narrow") as run, psycopg.connect(conninfo(run.database())) as conn:
        fill(conn, args.keys)
        keys = [rng.sample(range(args.keys), args.batch) for _ in range(args.rounds)]
        same = [(rows, rows) for rows in (deltas(k, rng) for k in keys)]  # the same keys
        spent = alternate(conn, {"wide": WIDE_UPDATE, "narrow": NARROW_UPDATE}, same)
        fresh = iter(range(args.keys + 5, args.keys + 5 + 2 * args.rounds * args.batch))
        new = [
            deltas([next(fresh) for _ in range(args.batch)], rng) for _ in range(args.rounds * 2)
        ]
        own = list(zip(new[::2], new[1::2], strict=True))  # new keys, each way its own
        inserts = alternate(conn, {"one row": WIDE_INSERT, "two rows": SPLIT_INSERT}, own)
    warm = args.rounds // 6  # the first rounds warm the caches
    medians = {k: statistics.median(v[warm:]) for k, v in (spent | inserts).items()}
    for name, what in (
        ("wide", "update a key's 70-column accumulator row (now)"),
        ("narrow", "update its 35-column row of amounts, found through the key (split)"),
        ("one row", "insert a new key's accumulator row (now)"),
        ("two rows", "insert the row and its row of amounts (split)"),
    ):
        report.row(write=name, what=what, us_per_row=round(medians[name], 1))
    update = round(medians["narrow"] / medians["wide"], 3)
    insert = round(medians["two rows"] / medians["one row"], 3)
    report.target("update: narrow / wide, median us per row", update, "< 1", update < 1)
    report.target("insert: two rows / one row, median us per key", insert, "<= 1", insert <= 1)
    saved, added = medians["wide"] - medians["narrow"], medians["two rows"] - medians["one row"]
    report.note(
        f"the split pays when updates outnumber new keys by more than {added / saved:.1f} to 1"
        if saved > 0
        else "the split saves nothing on updates"
    )
    report.save()


if __name__ == "__main__":
    main()
