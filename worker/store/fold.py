"""The fold: the claim versions of committed batches, applied to claims and totals in sets.

Ingest records each event once (a ``received_event`` row holding the version it carries and the
batch it came in) and commits. A fold then takes batches committed and not folded yet and, in
one statement on Postgres (a handful on SQLite) whatever their size:

1. picks each claim's highest version among them (``newest``) and keeps those above the claim's
   stored version (``moved``): the ledger law, a claim contributes its highest version;
2. counts each batch's versions as applied (above the claim's version when the fold began) or
   stale;
3. adds each moved claim's new contribution to its key and takes its old one out of its old key
   (``deltas``: the 30 columns spread by network, as models.buckets says), updating the existing
   accumulators by key and inserting the missing ones (and their pairs);
4. writes each moved claim's new state and marks the batches folded, in the same transaction.

So totals depend on the set of versions folded, never on how they were cut into batches or
folds, and a fold that dies rolls back whole: the next one takes the same batches.

One fold at a time. Postgres: a transaction-scoped advisory lock, tried, not waited for: a process
that finds it taken leaves the work to its holder (:func:`fold_committed` says why nothing is
left behind). SQLite has one writer at a time already, and folds each batch inside the ingest's
own transaction.

A version the store refuses at fold time (a total past 64 bits, say) must not stall every key
behind it: a fold refused is split by batch, then by claim, and a claim's versions refused alone
become dead letters (and are forgotten as received, so a replay can bring them back).
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from datetime import datetime
from functools import lru_cache
from typing import Any, Final, TypeVar

from sqlalchemy import (
    BindParameter,
    Select,
    TextClause,
    bindparam,
    delete,
    func,
    select,
    text,
    update,
)
from sqlalchemy.exc import DataError, DBAPIError, IntegrityError, OperationalError
from sqlmodel import Session

from models.buckets import BUCKETS, COLUMNS
from models.tables import CLAIM_CENTS
from worker import failpoints
from worker.db import in_transaction, is_postgres, utcnow
from worker.logs import Log
from worker.settings import get_settings
from worker.store import counters
from worker.store.bulk import update_rows
from worker.store.dead_letters import dead_letter
from worker.store.tables import KEY_COLS, T_ACCUM, T_BATCH, T_EVENT

log = Log("fold")

T = TypeVar("T")

FOLD_LOCK_SPACE: Final = 0x41430002
"""The first key of the fold's advisory lock (0x41430001 was the claims' locks', up to migration
0017)."""
MAX_BATCHES: Final = 200
MAX_EVENTS: Final = 100_000
"""A fold takes whole batches, the oldest first, up to ``MAX_BATCHES`` of them and as long as
the events they received before the last one stay under ``MAX_EVENTS`` (at least one batch):
a backlog is folded in transactions of bounded length, each committed as it goes, whatever
size of message its producers send (a fold of 400,000 versions would hold its accumulators'
rows from the flush for seconds)."""

KEYS: Final = ", ".join(KEY_COLS)
STATE: Final = (*KEY_COLS, "network", *CLAIM_CENTS)
"""What a claim's contribution is made of: its key, its network, its amounts."""


@dataclass
class FoldReport:
    """What one or more folds did (counts only: safe for logs and Flower)."""

    batches: int = 0
    versions: int = 0
    applied: int = 0
    stale: int = 0
    claims: int = 0
    quarantined: int = 0

    def add(self, other: FoldReport) -> FoldReport:
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))
        return self


@dataclass
class Counted:
    """Per batch: (versions, applied)."""

    by_batch: dict[int, tuple[int, int]] = field(default_factory=dict)
    claims: int = 0
    quarantined: dict[int, int] = field(default_factory=dict)
    """Per batch: versions the store refused, now dead letters (counted as invalid)."""

    def merge(self, other: Counted) -> None:
        for batch, (n, applied) in other.by_batch.items():
            was = self.by_batch.get(batch, (0, 0))
            self.by_batch[batch] = (was[0] + n, was[1] + applied)
        self.claims += other.claims
        for batch, n in other.quarantined.items():
            self.quarantined[batch] = self.quarantined.get(batch, 0) + n


def values_in(postgres: bool, param: str) -> str:
    """A subquery of the values of the JSON array bound as ``param``."""
    if not postgres:
        return f"SELECT value FROM json_each(:{param})"
    return f"SELECT value FROM json_array_elements_text(CAST(:{param} AS json))"


def scope(postgres: bool, by_claim: bool) -> str:
    """The versions a fold takes, as a condition on ``received_event r``: those of the batches
    bound as ``:batches`` (and of the claims bound as ``:claims``, when ``by_claim``).

    Postgres: ``= ANY`` of a typed array, which the planner reads as so many index lookups on
    ``batch_id``; ``IN`` over a JSON array's elements left it guessing their number, and it
    scanned the whole table instead (a fold per batch of 500 cost 134 us/event at 50,000 events
    received, growing with the table)."""
    if postgres:
        where = "r.batch_id = ANY(CAST(:batches AS BIGINT[]))"
    else:
        where = f"r.batch_id IN ({values_in(postgres, 'batches')})"
    if by_claim:
        where += f" AND r.claim_id IN ({values_in(postgres, 'claims')})"
    return where


PICK: Final = "ROW_NUMBER() OVER (PARTITION BY r.claim_id ORDER BY r.version DESC) AS pick"
"""A version's rank among its claim's versions in scope: 1 for the highest."""
EARLIER: Final = (
    "MAX(r.version) OVER (PARTITION BY r.claim_id ORDER BY r.batch_id, r.version"
    " ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING) AS earlier"
)
"""The highest version of the same claim before this one in scope, in the order the batches
began (within a batch, in version order)."""
APPLIED: Final = (
    "SUM(CASE WHEN version > COALESCE(stored, -1) AND version > COALESCE(earlier, -1)"
    " THEN 1 ELSE 0 END) AS applied"
)
"""Versions applied: above the claim's stored version and above every ``earlier`` one; the rest
are stale."""


SUM_CENTS: Final = "accumsync_sum_cents"
"""Postgres: ``SUM`` of ``bigint`` as a ``bigint`` (migration 0015); ``SUM`` gives ``numeric``,
30 of them per key carried through the fold and cast back, a tenth of its time."""


def summed(postgres: bool) -> str:
    """``parts`` and ``deltas`` over ``moved``: each moved claim's new contribution to its key
    and its old one taken out of its old key, summed by key (the 30 columns spread by network,
    as models.buckets says)."""
    add = SUM_CENTS if postgres else "SUM"
    cents = ", ".join(CLAIM_CENTS)
    old_cents = ", ".join(f"old_{c}" for c in CLAIM_CENTS)
    old_keys = ", ".join(f"old_{k}" for k in KEY_COLS)
    sums = []
    for bucket, c in zip(BUCKETS, CLAIM_CENTS, strict=True):
        total, net, oon = bucket.columns
        sums.append(f"{add}(sign * {c}) AS {total}")
        sums.append(f"{add}(CASE WHEN network = 'in' THEN sign * {c} ELSE 0 END) AS {net}")
        sums.append(f"{add}(CASE WHEN network = 'out' THEN sign * {c} ELSE 0 END) AS {oon}")
    return f"""parts AS (
  SELECT {KEYS}, network, 1 AS sign, {cents} FROM moved WHERE status <> 'reversed'
  UNION ALL
  SELECT {old_keys}, old_network, -1, {old_cents} FROM moved WHERE old_subscriber_id IS NOT NULL
), deltas AS (
  SELECT {KEYS}, {", ".join(sums)} FROM parts GROUP BY {KEYS}
)"""


def ctes(by_claim: bool) -> str:
    """``newest``, ``moved``, ``parts`` and ``deltas`` over the versions in :func:`scope`."""
    old = ", ".join(f"c.{col} AS old_{col}" for col in STATE)
    return f"""WITH newest AS (
  SELECT * FROM (
    SELECT r.*, {PICK}
    FROM received_event r WHERE {scope(False, by_claim)}
  ) AS ranked WHERE pick = 1
), moved AS (
  SELECT n.*, c.version AS old_version, {old}
  FROM newest n LEFT JOIN claim c ON c.claim_id = n.claim_id
  WHERE c.claim_id IS NULL OR c.version < n.version
), {summed(False)}
"""


def same_key(left: str, right: str) -> str:
    return " AND ".join(f"{left}.{k} = {right}.{k}" for k in KEY_COLS)


NOW = bindparam("now", type_=T_ACCUM.c.updated_at.type)


CLAIM_COLS: Final = (
    "claim_id",
    "version",
    "content_hash",
    *KEY_COLS,
    "network",
    "member_seq",
    "service_date",
    "adjudicated_at",
    *CLAIM_CENTS,
)
"""A claim row as the fold writes it."""


def new_pairs(by_claim: bool) -> str:
    """SQLite: make the pairs of the keys that gain a contribution, before the accumulators
    that name them (a key that loses one has its accumulator, so its pair, already): the key of
    each claim's newest version in scope, unless it reverses the claim or the claim holds that
    version or a later one already (``moved``'s rule, over five columns). Postgres draws them
    in its one statement (:func:`pg_fold`)."""
    return f"""INSERT INTO pair (subscriber_id, group_id, attempts, lease_gen)
SELECT DISTINCT n.subscriber_id, n.group_id, 0, 0 FROM (
  SELECT r.claim_id, r.version, r.status, r.subscriber_id, r.group_id,
    {PICK}
  FROM received_event r WHERE {scope(False, by_claim)}
) AS n
WHERE n.pick = 1 AND n.status <> 'reversed'
AND NOT EXISTS (SELECT 1 FROM claim c WHERE c.claim_id = n.claim_id AND c.version >= n.version)
AND NOT EXISTS (
  SELECT 1 FROM pair p WHERE p.subscriber_id = n.subscriber_id AND p.group_id = n.group_id)
ON CONFLICT DO NOTHING"""


CLAIM_STATE: Final = ", ".join(
    [f"CASE WHEN status = 'reversed' THEN NULL ELSE {c} END AS {c}" for c in (*KEY_COLS, "network")]
    + ["member_seq", "service_date", "adjudicated_at"]
    + [f"CASE WHEN status = 'reversed' THEN 0 ELSE {c} END AS {c}" for c in CLAIM_CENTS]
)
"""A moved claim's new state, after its id, version and hash, in :data:`CLAIM_COLS`' order: a
reversal's has no key and no money."""
MOVED_STATES: Final = f"SELECT claim_id, version, content_hash, {CLAIM_STATE} FROM moved WHERE"
"""Each moved claim's row as written, for a condition to end (SQLite's upsert takes them all)."""


def claimed() -> str:
    """SQLite: write each moved claim's new state."""
    return f"""INSERT INTO claim ({", ".join(CLAIM_COLS)})
{MOVED_STATES} true
ON CONFLICT (claim_id) DO UPDATE SET {", ".join(f"{c} = excluded.{c}" for c in CLAIM_COLS[1:])}"""


OVERFLOW: Final = "abs(-9223372036854775807 - 1)"
"""SQLite: an expression that fails as ``SUM`` does past 64 bits (``integer overflow``)."""


def checked(total: str) -> str:
    """SQLite: the integer sum ``total``, or the error ``SUM`` gives past 64 bits. SQLite's
    ``+`` makes a ``REAL`` of an integer sum past 64 bits, which a ``BIGINT`` column stores as
    it is: a total of cents would become a float, and lose its cents, without an error (Postgres
    refuses it: ``bigint out of range``)."""
    return f"CASE WHEN typeof({total}) = 'integer' THEN {total} ELSE {OVERFLOW} END"


def refused(exc: DBAPIError) -> bool:
    """The store refused a fold's values (a total past 64 bits), as opposed to being away:
    Postgres's ``DataError`` or ``IntegrityError``; SQLite's ``integer overflow``, which it
    reports as an ``OperationalError``."""
    if isinstance(exc, DataError | IntegrityError):
        return True
    return isinstance(exc, OperationalError) and "integer overflow" in str(exc.orig)


def parts(by_claim: bool) -> dict[str, str]:
    """SQLite: the fold's steps after :func:`new_pairs`, each a statement of its own over the
    ``ctes``, in the order they run (Postgres: :func:`pg_fold`)."""
    keys_of_d = ", ".join(f"d.{k}" for k in KEY_COLS)
    added = ", ".join(f"{c} = {checked(f'accumulator.{c} + deltas.{c}')}" for c in COLUMNS)
    return {
        # Applied: above the claim's stored version and above every version of it before, in
        # the order the batches began (within a batch, in version order); stale otherwise. The
        # stored version is a lookup per version.
        "counted": f"""SELECT batch_id, COUNT(*) AS versions,
  {APPLIED}
FROM (
  SELECT r.batch_id, r.version,
    (SELECT c.version FROM claim c WHERE c.claim_id = r.claim_id) AS stored,
    {EARLIER}
  FROM received_event r WHERE {scope(False, by_claim)}
) AS versions
GROUP BY batch_id""",
        "updated": f"""UPDATE accumulator SET {added},
  change_seq = accumulator.change_seq + 1,
  dirty_since = COALESCE(accumulator.dirty_since, :now), updated_at = :now
FROM deltas WHERE {same_key("accumulator", "deltas")}""",
        "inserted": f"""INSERT INTO accumulator ({KEYS}, pair_id, {", ".join(COLUMNS)},
  change_seq, pushed_seq, attempts, held, dirty_since, updated_at)
SELECT {keys_of_d}, p.id, {", ".join(f"d.{c}" for c in COLUMNS)}, 1, 0, 0, :held, :now, :now
FROM deltas AS d
LEFT JOIN pair p ON p.subscriber_id = d.subscriber_id AND p.group_id = d.group_id
WHERE NOT EXISTS (SELECT 1 FROM accumulator a WHERE {same_key("a", "d")})
ORDER BY {keys_of_d}""",
        "claimed": claimed(),
    }


def pg_fold(by_claim: bool) -> str:
    """The whole fold on Postgres, one statement. The versions in scope are read once, each
    with its claim's stored row (one lookup per version), and every step is a common table
    expression over them:

    - ``scoped``: each version with its claim's stored version and state, its rank among its
      claim's versions in scope (``pick``), and the highest version before it in batch order
      (``earlier``);
    - ``moved``: each claim's highest version in scope, above the stored one;
    - ``counted``: per batch, its versions and those applied;
    - ``parts`` and ``deltas`` (:func:`summed`);
    - ``found``: each key of ``deltas`` with its accumulator's id, if it has one (one lookup
      per key); ``added`` adds to those, by id;
    - ``keyed``: each key without an accumulator, with its pair's id: the stored pair's, or,
      for a pair not stored yet, one id drawn from the pairs' sequence for all of its keys, in
      the same rows. So the accumulators name a new pair without a join to the pairs' insert:
      that join of two common table expressions, which no index serves, was finding 16's
      quadratic fold;
    - the new pairs and accumulators inserted; the moved claims' rows updated (a claim stored)
      or inserted (a new one).

    Plain updates and inserts, never ``INSERT .. ON CONFLICT``: the lookups that decide between
    them are done already (``found``, the claim's row in ``scoped``), and an upsert pays for its
    own again, with a speculative insertion and a row lock written to the WAL per row. Only the
    fold inserts accumulators, pairs and claims, one fold at a time (the fold lock), so none of
    them is stored by anyone else meanwhile; if one were, the insert fails and the fold is split
    (:func:`isolating`), never pointed at a row that does not exist. A flush updating an
    accumulator meanwhile is waited for, and the addition applies to its row as it left it."""
    picked = ", ".join(f"r.{c}" for c in (*CLAIM_COLS, "batch_id", "status"))
    old = ", ".join(f"c.{col} AS old_{col}" for col in STATE)
    keys_of_k = ", ".join(f"k.{k}" for k in KEY_COLS)
    added = ", ".join(f"{c} = accumulator.{c} + f.{c}" for c in COLUMNS)
    return f"""WITH scoped AS MATERIALIZED (
  SELECT {picked},
    c.version AS stored, {old},
    {PICK},
    {EARLIER}
  FROM received_event r LEFT JOIN claim c ON c.claim_id = r.claim_id
  WHERE {scope(True, by_claim)}
), moved AS MATERIALIZED (
  SELECT * FROM scoped WHERE pick = 1 AND (stored IS NULL OR stored < version)
), counted AS (
  SELECT batch_id, COUNT(*) AS versions,
    {APPLIED}
  FROM scoped GROUP BY batch_id
), {summed(True)}, found AS MATERIALIZED (
  SELECT d.*, a.id AS accumulator_id
  FROM deltas d LEFT JOIN accumulator a ON {same_key("a", "d")}
), added AS (
  UPDATE accumulator SET {added},
    change_seq = accumulator.change_seq + 1,
    dirty_since = COALESCE(accumulator.dirty_since, :now), updated_at = :now
  FROM found f WHERE accumulator.id = f.accumulator_id
), keyed AS MATERIALIZED (
  SELECT k.*, COALESCE(k.stored_pair,
      MAX(k.drawn) OVER (PARTITION BY k.subscriber_id, k.group_id)) AS pair_id
  FROM (
    SELECT f.*, p.id AS stored_pair,
      CASE WHEN p.id IS NULL
        AND ROW_NUMBER() OVER (PARTITION BY f.subscriber_id, f.group_id) = 1
        THEN nextval(pg_get_serial_sequence('pair', 'id')) END AS drawn
    FROM found f
    LEFT JOIN pair p ON p.subscriber_id = f.subscriber_id AND p.group_id = f.group_id
    WHERE f.accumulator_id IS NULL
  ) AS k
), paired AS (
  INSERT INTO pair (id, subscriber_id, group_id, attempts, lease_gen)
  SELECT DISTINCT pair_id, subscriber_id, group_id, 0, 0 FROM keyed WHERE stored_pair IS NULL
), accumulated AS (
  INSERT INTO accumulator ({KEYS}, pair_id, {", ".join(COLUMNS)},
    change_seq, pushed_seq, attempts, held, dirty_since, updated_at)
  SELECT {keys_of_k}, k.pair_id, {", ".join(f"k.{c}" for c in COLUMNS)}, 1, 0, 0, :held, :now, :now
  FROM keyed AS k ORDER BY {keys_of_k}
), restated AS (
  UPDATE claim SET {", ".join(f"{c} = m.{c}" for c in CLAIM_COLS[1:])}
  FROM ({MOVED_STATES} stored IS NOT NULL) AS m
  WHERE claim.claim_id = m.claim_id
), claimed AS (
  INSERT INTO claim ({", ".join(CLAIM_COLS)})
  {MOVED_STATES} stored IS NULL
)
SELECT batch_id, versions, applied, (SELECT count(*) FROM moved) FROM counted"""


PARAMS: Final[tuple[BindParameter[Any], ...]] = (NOW, bindparam("held", False))


def bound(sql: str) -> TextClause:
    """``text(sql)`` with the types of the parameters it names."""
    return text(sql).bindparams(*[p for p in PARAMS if f":{p.key}" in sql])


@lru_cache(maxsize=8)
def statements(postgres: bool, by_claim: bool) -> list[TextClause]:
    """The fold's statements (built once per dialect and scope), in the order they run.

    Postgres: one statement (:func:`pg_fold`), returning (batch_id, versions, applied, claims
    moved) per batch. SQLite has no data-modifying common table expression: a statement per
    step, each computing the ``ctes`` again from the same rows (only the last one writes
    claims); the first makes the pairs the new accumulators name, the second returns the
    counts."""
    if postgres:
        return [bound(pg_fold(by_claim))]
    with_, steps = ctes(by_claim), parts(by_claim)
    first = "SELECT batch_id, versions, applied, (SELECT count(*) FROM moved) FROM counted"
    pairs = new_pairs(by_claim)
    counting = f"{with_}, counted AS ({steps['counted']})\n{first}"
    rest = [f"{with_}{steps[name]}" for name in ("updated", "inserted", "claimed")]
    return [bound(sql) for sql in (pairs, counting, *rest)]


def apply(session: Session, batches: Sequence[int], claims: Sequence[str] | None = None) -> Counted:
    """Fold the versions of ``batches`` (of ``claims`` only, when given) into claims and totals;
    their batches are not marked (the caller does, once every part of them is folded)."""
    postgres = is_postgres(session)
    first, *rest = statements(postgres, claims is not None)
    ids = f"{{{','.join(map(str, batches))}}}" if postgres else json.dumps(list(batches))
    params: dict[str, Any] = {"batches": ids, "now": utcnow()}
    if claims is not None:
        params["claims"] = json.dumps(list(claims))
    if not postgres:  # the pairs first, then the count (Postgres: one statement does all)
        session.execute(first, params)
        first, *rest = rest
    counted = Counted()
    for batch, versions, applied, moved in session.execute(first, params):
        counted.by_batch[int(batch)] = (int(versions), int(applied or 0))
        counted.claims = int(moved)
    for stmt in rest:
        session.execute(stmt, params)
    return counted


def isolating(session: Session, batches: Sequence[int]) -> Counted:
    """:func:`apply`, and if the store refuses it, the same by batch, then by claim: a claim
    refused alone has its versions in these batches quarantined, every other one is folded."""
    try:
        with session.begin_nested():
            return apply(session, batches)
    except DBAPIError as exc:
        if not refused(exc):
            raise
        if len(batches) > 1:
            counted = Counted()
            for batch in batches:
                counted.merge(isolating(session, [batch]))
            return counted
        return by_claim(session, batches[0], exc)


def by_claim(session: Session, batch: int, exc: Exception) -> Counted:
    """Fold one refused batch claim by claim; quarantine the claims refused alone."""
    e = T_EVENT.c
    claim_ids = session.execute(
        select(e.claim_id).where(e.batch_id == batch).distinct().order_by(e.claim_id)
    ).scalars()
    counted = Counted(by_batch={batch: (0, 0)})
    for claim_id in list(claim_ids):
        try:
            with session.begin_nested():
                counted.merge(apply(session, [batch], [claim_id]))
        except DBAPIError as alone:
            if not refused(alone):
                raise
            n = quarantine(session, batch, claim_id, alone)
            counted.quarantined[batch] = counted.quarantined.get(batch, 0) + n
    quarantined = sum(counted.quarantined.values())
    log.warning("fold.batch_refused", error=error_name(exc), quarantined=quarantined)
    return counted


def quarantine(session: Session, batch: int, claim_id: str, exc: Exception) -> int:
    """Dead-letter the versions of ``claim_id`` in ``batch`` and forget them as received."""
    e = T_EVENT.c
    rows = session.execute(
        select(T_EVENT).where(e.batch_id == batch, e.claim_id == claim_id)
    ).mappings()
    first = (str(getattr(exc, "orig", exc)).strip().splitlines() or ["no message"])[0][:200]
    reason = f"event: the store refused it ({error_name(exc)}: {first})"  # as ingest says it
    now = utcnow()
    n = 0
    for row in rows:
        dead_letter(session, "ingest", event_of(row), reason, now)
        n += 1
    session.execute(delete(T_EVENT).where(e.batch_id == batch, e.claim_id == claim_id))
    return n


def error_name(exc: Exception) -> str:
    return type(getattr(exc, "orig", exc)).__name__


def event_of(row: Any) -> dict[str, Any]:
    """The ClaimEvent a version row was received as (canonical form), for a dead letter."""
    amounts = {
        c.removesuffix("_cents"): f"{row[c] // 100}.{row[c] % 100:02d}"
        for c in CLAIM_CENTS
        if row[c]
    }
    event: dict[str, Any] = {
        k: row[k]
        for k in ("event_id", "claim_id", "version", "status", *KEY_COLS, "network", "member_seq")
        if row[k] is not None
    }
    if row["service_date"] is not None:
        event["service_date"] = row["service_date"].isoformat()
    if row["adjudicated_at"] is not None:
        event["adjudicated_at"] = row["adjudicated_at"].isoformat()
    return event | {"amounts": amounts}


def fold_batches(session: Session, batches: Sequence[int]) -> FoldReport:
    """Fold ``batches`` (committed, not folded yet) and mark them folded, in ``session``'s
    transaction; the fold lock (Postgres) is the caller's."""
    if not batches:
        return FoldReport()
    started = time.perf_counter()
    counted = isolating(session, batches)
    now = utcnow()
    quarantined = sum(counted.quarantined.values())
    report = FoldReport(len(batches), claims=counted.claims, quarantined=quarantined)
    rows = []
    for batch in batches:
        versions, applied = counted.by_batch.get(batch, (0, 0))
        rows.append({"id": batch, "applied": applied, "stale": versions - applied})
        report.versions += versions
        report.applied += applied
    report.stale = report.versions - report.applied
    update_rows(session, T_BATCH, rows, match=["id"], constant={"folded_at": now})
    for batch, refused in counted.quarantined.items():
        b = T_BATCH.c
        session.execute(update(T_BATCH).where(b.id == batch).values(invalid=b.invalid + refused))
    counts = {"applied": report.applied, "stale": report.stale, "invalid": quarantined}
    counters.add(session, {f"events.{k}": n for k, n in counts.items()})
    failpoints.hit("fold.before_commit")
    log.debug("fold.folded", ms=int((time.perf_counter() - started) * 1000), **vars(report))
    return report


TRY_LOCK: Final = text("SELECT pg_try_advisory_xact_lock(:space, 0)").bindparams(
    space=FOLD_LOCK_SPACE
)
BY_INDEX: Final = text(
    "SELECT set_config('enable_seqscan', 'off', true), set_config('enable_hashjoin', 'off', true),"
    " set_config('enable_mergejoin', 'off', true),"
    " set_config('max_parallel_workers_per_gather', '0', true)"
)
"""For the rest of the transaction: index lookups driven by the batch's rows, never a scan of a
table, a hash of one or parallel workers. A batch's statements touch a few hundred rows of
tables of millions, which the planner only knows when their statistics are fresh. With stale
ones (a store autovacuum has not analyzed yet) it scanned and hashed whole tables, or started
parallel workers per fold: at 600,000 events received the versions' insert took 270 ms a batch
and ingest fell to 1,200 events/s; at 6 million a fold spent 46 of its 52 ms gathering workers
(3.8 ms without)."""


def oldest_batches(limit: int = MAX_BATCHES, events: int = MAX_EVENTS) -> Select[tuple[int]]:
    """The oldest unfolded batches one fold takes: at most ``limit``, and each only while the
    events received by the ones before it stay under ``events`` (so at least one)."""
    b = T_BATCH.c
    before = func.sum(b.received).over(order_by=b.id) - b.received
    ranked = (
        select(b.id, before.label("before"))
        .where(b.folded_at.is_(None))
        .order_by(b.id)
        .limit(limit)
        .subquery()
    )
    return select(ranked.c.id).where(ranked.c.before < events).order_by(ranked.c.id)


def fold_round(
    session: Session, limit: int = MAX_BATCHES, events: int = MAX_EVENTS
) -> FoldReport | None:
    """One fold of the oldest unfolded committed batches (:func:`oldest_batches`); None when
    another process holds the fold (Postgres)."""
    if is_postgres(session):
        if not session.execute(TRY_LOCK).scalar_one():
            return None
        session.execute(BY_INDEX)
    batches = list(session.execute(oldest_batches(limit, events)).scalars())
    return fold_batches(session, batches)


def oldest_unfolded(session: Session) -> tuple[int, datetime | None]:
    """Batches committed and not folded yet, and when the oldest of them began."""
    b = T_BATCH.c
    query = select(func.count(), func.min(b.at)).where(b.folded_at.is_(None))
    count, oldest = session.execute(query).one()
    return int(count), oldest


def unfolded(session: Session) -> int:
    """Batches committed and not folded yet."""
    return oldest_unfolded(session)[0]


def fold_committed(run: Callable[[Callable[[Session], Any]], Any] = in_transaction) -> FoldReport:
    """Fold every committed batch, unless another process is folding: it then folds them.

    No batch is left behind. A round takes the lock, folds what is committed, and commits; then
    the process looks again *after* that commit released the lock. A batch committed while a fold
    held the lock is then seen: by this process's next round, or, if another took the lock in
    between, by that one's (its look happens after it took the lock, so after the commit). The
    look is one count, not a second round: a round that finds nothing costs a transaction of
    four statements, once per fold of every batch. ``run`` runs one transaction (tests pass
    their own engine's).
    """
    total = FoldReport()
    while True:
        report: FoldReport | None = run(fold_round)
        if report is None:
            return total
        total.add(report)
        if not run(unfolded):
            return total


class Soon:
    """Fold what is committed ``delay`` seconds (``ACCUMSYNC_FOLD_DELAY``) after a batch asked
    for it: one fold per process for every batch that asks meanwhile.

    A fold has a fixed cost whatever it takes (its statements, their plans, the batches' rows
    and the counters written, a commit), so one fold of four batches costs less than four of
    one (``python -m bench.backlog``: 45.8 against 59.4 us/event). An ingest task asks and goes
    on to its next message; the fold runs on a timer thread, beside the next batch's ingest.
    A batch that asks while a fold runs arms the next one, so none waits longer than a fold
    and a delay; a process that dies with its fold pending leaves the batches to the next fold
    anyone runs (the next batch's, the dispatcher's round, beat's sweep, ``accumsync flush``),
    as :func:`fold_committed` leaves nothing behind. ``run`` folds (tests pass their own)."""

    def __init__(
        self, delay: float | None = None, run: Callable[[], FoldReport] = lambda: fold_committed()
    ) -> None:
        self._delay = delay
        self.run = run
        self._lock = threading.Lock()
        self._timer: threading.Timer | None = None  # armed, not fired yet
        self._last: threading.Timer | None = None  # the latest armed, maybe folding now

    def ask(self) -> None:
        """A batch is committed: fold within ``delay``, with whatever else is committed by then."""
        with self._lock:
            if self._timer is None:
                delay = get_settings().fold_delay if self._delay is None else self._delay
                self._timer = self._last = threading.Timer(delay, self._fire)
                self._timer.daemon = True
                self._timer.start()

    def now(self) -> None:
        """Fold now what a pending fold would have, after a fold under way ends (a process
        about to exit: its timer's thread would die with it, the fold rolled back)."""
        with self._lock:
            pending, self._timer = self._timer, None
            last = self._last
        if pending is not None:
            pending.cancel()
        if last is not None:
            last.join()
        if pending is not None:
            self._fold()

    def _fire(self) -> None:
        with self._lock:
            self._timer = None
        self._fold()

    def _fold(self) -> None:
        started = time.perf_counter()
        try:
            report = self.run()
        except DBAPIError as exc:  # the batches stay committed: the next fold takes them
            log.warning("fold.failed", error=error_name(exc))
        except Exception as exc:  # on a timer's thread an error would reach no one: said here
            log.error("fold.crashed", error=type(exc).__name__)
        else:
            ms = int((time.perf_counter() - started) * 1000)
            log.debug("fold.soon", ms=ms, batches=report.batches, versions=report.versions)


PROCESS_FOLD: Final = Soon()
"""This process's fold: one for the batches it records within ``ACCUMSYNC_FOLD_DELAY`` of each
other (an ingest task asks; a pool process about to exit folds what it holds,
``worker.celery``'s ``worker_process_shutdown``)."""


def in_session_of(engine: Any) -> Callable[[Callable[[Session], T]], T]:
    """A ``run`` for :func:`fold_committed` on ``engine``: one transaction per call."""

    def run(work: Callable[[Session], T]) -> T:
        with Session(engine) as session:
            out = work(session)
            session.commit()
            return out

    return run
