"""``accumsync reconcile``: read VBA's rows and judge each of our keys against them and against the
ledger (:mod:`models.reconcile` decides; this reads, records and repairs).

A run checks its pairs in id order and commits its cursor after each, so Ctrl-C, a crash or a VBA
outage loses nothing: the same command resumes after the last pair it finished. It reads within
the fleet's shared rate budget (every call takes a token of the shared bucket, like a flush) and
within its own share of it (``rate``), so flushes go on beside it.

``repair`` never writes to VBA: it sets a drifted key's confirmed share, field by field, to what
VBA's row shows (:func:`models.reconcile.repaired_pushed`) and marks it dirty, and the next flush
rewrites it under the normal protocol. It never guesses: a row found absent is read again first
(one read of absence proves nothing), and a field the evidence can't settle (VBA shows less than
our share, but not nothing) holds the key with a below-share dead letter, as the flush would, for
a person to resolve. A key whose flush moved on while it was read is left for the next run.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, cast

from sqlalchemy import CursorResult, RowMapping, select, tuple_, update
from sqlmodel import Session

from models.buckets import COLUMNS
from models.events import canon
from models.ledger import totals
from models.reconcile import DRIFT, REPAIRABLE, Finding, Ownership, Verdict, judge, repaired_pushed
from models.sync import LetterKind, below_share_letter, cents_of_vba
from models.tables import PUSHED
from worker.db import as_utc, session_scope, utcnow
from worker.flush.protocol import Unattributable, bump_pushed_seq, read_remote
from worker.logs import Log
from worker.store.dead_letters import dead_letter
from worker.store.tables import KEY_COLS, T_ACCUM, T_CLAIM, T_FINDING, T_PAIR, T_RUN, claim_state
from worker.vba import VbaClient
from worker.vba.ratelimit import LocalBucket

log = Log("reconcile")
CHUNK = 100  # pairs whose claims are read in one query
SLICE = 1800  # seconds a scheduled reconcile task checks before it queues the next
BUSY = 600.0  # seconds: an unfinished run that moved this recently is still being run
Key = tuple[str, ...]
Cents = dict[str, int]
Remote = dict[Key, Cents | str]
"""VBA's rows of a pair by canonical key: cents, or why the row can't be used."""


class ScopeError(ValueError):
    """The pairs asked for can't be reconciled as asked (the message says why)."""


@dataclass(frozen=True)
class Scope:
    """The pairs a run checks, and how the operator named them."""

    label: str
    pair_ids: tuple[int, ...]
    every: bool = False

    @property
    def digest(self) -> str:
        """What a resumed run must match: "all pairs" is one scope however many pairs it
        holds (pairs added since the run began are checked too, after the cursor)."""
        named = "all" if self.every else ",".join(map(str, self.pair_ids))
        return hashlib.sha256(named.encode()).hexdigest()


def scope_of(
    session: Session,
    subscriber: str | None = None,
    group: str | None = None,
    pairs_file: Path | None = None,
    every: bool = False,
) -> Scope:
    """The pairs named by exactly one of: a subscriber and group, a file of them, or all."""
    named = [subscriber is not None or group is not None, pairs_file is not None, every]
    if sum(named) != 1:
        raise ScopeError("name the pairs: --subscriber S --group G, --pairs FILE, or --all")
    p = T_PAIR.c
    if every:
        ids = session.execute(select(p.id).order_by(p.id)).scalars().all()
        return Scope("all pairs", tuple(ids), every=True)
    if pairs_file is not None:
        wanted = list(read_pairs(pairs_file))
        label = f"{len(wanted)} pairs from {pairs_file.name}"
    else:
        if subscriber is None or group is None:
            raise ScopeError("--subscriber and --group go together")
        wanted, label = [(canon(subscriber), canon(group))], "one pair"
    query = select(p.id, p.subscriber_id, p.group_id).where(
        tuple_(p.subscriber_id, p.group_id).in_(wanted)
    )
    found = {(r.subscriber_id, r.group_id): r.id for r in session.execute(query)}
    if missing := len(set(wanted) - set(found)):
        raise ScopeError(f"{missing} of the pairs named have no accumulators here")
    return Scope(label, tuple(sorted(found.values())))


def read_pairs(path: Path) -> Iterator[tuple[str, str]]:
    """``subscriber_id,group_id`` per line (a header line naming them is skipped)."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ScopeError(f"{path}: {exc.strerror}") from None
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.replace(" ", "").lower() == "subscriber_id,group_id":
            continue
        parts = [part.strip() for part in line.split(",")]
        if len(parts) != 2 or not all(parts):
            raise ScopeError(f"{path}:{number}: expected subscriber_id,group_id")
        yield canon(parts[0]), canon(parts[1])


@dataclass
class Summary:
    """A run's counts: keys checked and by finding, and the fields that drifted."""

    run_id: int
    scope: str
    pairs: int
    pairs_done: int
    keys_checked: int
    findings: dict[str, int] = field(default_factory=dict)
    fields: dict[str, int] = field(default_factory=dict)
    repaired: int = 0
    resumed: bool = False

    @property
    def drifted(self) -> int:
        return sum(n for f, n in self.findings.items() if Finding(f) in DRIFT)

    @property
    def equal(self) -> int:
        return self.keys_checked - sum(self.findings.values())

    def as_dict(self) -> dict[str, Any]:
        return asdict(self) | {"equal": self.equal, "drifted": self.drifted}


@dataclass(frozen=True)
class KeyState:
    accumulator_id: int
    key: Key
    ours: dict[str, int]
    pushed: dict[str, int]
    pushed_seq: int
    in_flight: bool
    held: bool


class Reconcile:
    """One run over a scope; ``on_pair`` is told after each pair (a progress bar)."""

    def __init__(
        self,
        vba: VbaClient,
        ownership: Ownership,
        rate: float,
        repair: bool = False,
        on_pair: Callable[[], None] = lambda: None,
    ) -> None:
        self.vba, self.ownership, self.repair, self.on_pair = vba, ownership, repair, on_pair
        self.bucket = LocalBucket(rate, 1)

    def start(self, scope: Scope, restart: bool = False) -> tuple[int, bool]:
        """The run to continue (an unfinished one of the same scope and mode) or a new one."""
        r = T_RUN.c
        with session_scope() as session:
            same = (r.scope_hash == scope.digest, r.repair == self.repair)
            query = select(r.id).where(*same, r.finished_at.is_(None)).order_by(r.id.desc())
            found = session.execute(query.limit(1)).scalar()
            if found is not None and not restart:
                return int(found), True
            now = utcnow()
            row: dict[str, Any] = {"scope": scope.label[:200], "scope_hash": scope.digest}
            row |= {"ownership": self.ownership, "repair": self.repair, "started_at": now}
            row |= {"updated_at": now, "last_pair_id": 0, "pairs_done": 0, "keys_checked": 0}
            run_id = session.execute(T_RUN.insert().values(row).returning(r.id)).scalar_one()
        return int(run_id), False

    def left(self, run_id: int, scope: Scope) -> list[int]:
        """The scope's pairs the run has not finished."""
        with session_scope() as session:
            cursor = session.execute(select(T_RUN.c.last_pair_id).where(T_RUN.c.id == run_id))
            done_to = int(cursor.scalar_one())
        return [pid for pid in scope.pair_ids if pid > done_to]

    def run(self, run_id: int, pair_ids: Sequence[int], until: float | None = None) -> bool:
        """Check each pair, committing the cursor after each; then mark the run finished. With
        ``until`` (a ``time.monotonic()``), stop there; False when pairs are left."""
        for start in range(0, len(pair_ids), CHUNK):
            chunk = pair_ids[start : start + CHUNK]
            with session_scope() as session:
                keys = load_keys(session, chunk)
                ledgers = load_ledgers(session, chunk)
            for pair_id in chunk:
                if until is not None and time.monotonic() >= until:
                    return False
                subscriber, group, states = keys[pair_id]
                remote = self._read(subscriber, group, [state.key for state in states])
                verdicts = [(s, self._judge(s, remote, ledgers)) for s in states]
                if self.repair and any(v.finding is Finding.MISSING for _, v in verdicts):
                    again = self._read(subscriber, group, [state.key for state in states])
                    remote = _absent_twice(remote, again)
                with session_scope() as session:
                    record(session, run_id, pair_id, verdicts, remote, self)
                self.on_pair()
        with session_scope() as session:
            done = {"finished_at": utcnow(), "updated_at": utcnow()}
            session.execute(update(T_RUN).where(T_RUN.c.id == run_id).values(done))
        log.info("reconcile.finished", run=run_id, pairs=len(pair_ids))
        return True

    def _read(self, subscriber: str, group: str, keys: list[Key]) -> Remote:
        """VBA's rows of the pair by canonical key: cents, or why a row can't be read (every
        key's, when a listed row's own key can't be read: it could be any of them)."""
        try:
            remote = read_remote(self.vba, subscriber, group, before_page=self.bucket.acquire)
        except Unattributable as exc:
            return dict.fromkeys(keys, str(exc))
        out: Remote = {}
        for key, row in remote.rows.items():
            fields = row.sub_cent()
            out[key] = (
                f"more than 2 decimals in {', '.join(fields)}"
                if fields
                else (cents_of_vba(row.amounts()))
            )
        return out | remote.unreadable

    def _judge(self, s: KeyState, remote: Remote, ledgers: dict[Key, Any]) -> Verdict:
        row = remote.get(s.key)
        if isinstance(row, str):
            return Verdict(Finding.UNREADABLE)
        ledger = ledgers.get(s.key) or dict.fromkeys(COLUMNS, 0)
        return judge(
            self.ownership, s.ours, s.pushed, row, ledger, in_flight=s.in_flight, held=s.held
        )


ABSENT_ONCE = "absent on one read, present on the next: not repaired on one read of absence"


def _absent_twice(first: Remote, again: Remote) -> Remote:
    """The pair's rows as a repair may use them: a key absent from the first read but found by
    the second is marked as such (a string: not repaired), so only an absence read twice is."""
    return first | {k: ABSENT_ONCE for k in again if k not in first}


Keys = dict[int, tuple[str, str, list[KeyState]]]


def load_keys(session: Session, pair_ids: Iterable[int]) -> Keys:
    """Each pair's subscriber, group and accumulators (ours, confirmed, in flight, held)."""
    p, a = T_PAIR.c, T_ACCUM.c
    out: Keys = {}
    for row in session.execute(select(p.id, p.subscriber_id, p.group_id).where(p.id.in_(pair_ids))):
        out[row.id] = (row.subscriber_id, row.group_id, [])
    query = select(T_ACCUM).where(a.pair_id.in_(pair_ids)).order_by(a.id)
    for r in session.execute(query).mappings():
        out[r["pair_id"]][2].append(key_state(r))
    return out


def key_state(r: RowMapping) -> KeyState:
    return KeyState(
        accumulator_id=r["id"],
        key=tuple(r[k] for k in KEY_COLS),
        ours={c: r[c] for c in COLUMNS},
        pushed={c: r[p] for c, p in zip(COLUMNS, PUSHED, strict=True)},
        pushed_seq=r["pushed_seq"],
        in_flight=r["intent_target"] is not None,
        held=bool(r["held"]),
    )


def load_ledgers(session: Session, pair_ids: Iterable[int]) -> dict[Key, dict[str, int]]:
    """The claims' current states summed per key, for the pairs' subscribers and groups."""
    p, c = T_PAIR.c, T_CLAIM.c
    pairs = select(p.subscriber_id, p.group_id).where(p.id.in_(pair_ids))
    query = select(T_CLAIM).where(tuple_(c.subscriber_id, c.group_id).in_(pairs))
    states = (claim_state(row) for row in session.execute(query).mappings())
    return cast(dict[Key, dict[str, int]], totals(states))


def record(
    session: Session,
    run_id: int,
    pair_id: int,
    verdicts: list[tuple[KeyState, Verdict]],
    remote: Remote,
    run: Reconcile,
) -> None:
    """The pair's findings, repairs and the run's cursor, in one transaction."""
    rows = []
    for state, verdict in verdicts:
        if verdict.finding is Finding.EQUAL:
            continue
        repaired = (
            run.repair
            and verdict.finding in REPAIRABLE
            and repair(session, state, remote.get(state.key), run.ownership)
        )
        diffs = [asdict(d) | {"of": "vba"} for d in verdict.fields]
        diffs += [asdict(d) | {"of": "ledger"} for d in verdict.ledger]
        rows.append(
            {
                "run_id": run_id,
                "accumulator_id": state.accumulator_id,
                "finding": verdict.finding.value,
                "fields": json.dumps(diffs),
                "repaired": bool(repaired),
            }
        )
    if rows:
        session.execute(T_FINDING.insert(), rows)
    r = T_RUN.c
    cursor = {"last_pair_id": pair_id, "pairs_done": r.pairs_done + 1, "updated_at": utcnow()}
    cursor["keys_checked"] = r.keys_checked + len(verdicts)
    session.execute(update(T_RUN).where(r.id == run_id).values(cursor))


def repair(session: Session, state: KeyState, remote: Any, ownership: Ownership) -> bool:
    """Set the key's confirmed share to what VBA shows, field by field, and mark it dirty,
    unless a flush moved it on since it was read (then the next run sees it anew), VBA's row
    could not be used (``remote`` a string: unreadable, or absent on one read only), or a field
    can't be settled from the row (then the key is held for a person). True when repaired."""
    if isinstance(remote, str):
        return False
    a = T_ACCUM.c
    fix = repaired_pushed(ownership, state.pushed, remote)
    still = (a.id == state.accumulator_id, a.pushed_seq == state.pushed_seq)
    unmoved = update(T_ACCUM).where(*still, a.intent_target.is_(None), a.held.is_(False))
    if fix.undecided:
        _hold_below_share(session, unmoved, state, remote, fix.undecided)
        return False
    values: dict[str, Any] = {p: fix.pushed[c] for c, p in zip(COLUMNS, PUSHED, strict=True)}
    values |= {"dirty_since": utcnow(), "attempts": 0, "next_attempt_at": None}
    done = cast(CursorResult[Any], session.execute(unmoved.values(values)))
    if done.rowcount == 1:
        bump_pushed_seq(session, [state.accumulator_id])
    return done.rowcount == 1


def _hold_below_share(
    session: Session, unmoved: Any, state: KeyState, remote: Cents, fields: tuple[str, ...]
) -> None:
    """Hold a key the repair can't settle, with the flush's below-share letter: the operator
    says, field by field, which share survived (``dead-letters resolve``)."""
    done = cast(CursorResult[Any], session.execute(unmoved.values(held=True)))
    if done.rowcount != 1:
        return
    why, detail = below_share_letter(remote, state.pushed, state.ours, list(fields))
    payload = {"accumulator_id": state.accumulator_id, "key": list(state.key)}
    payload |= {"kind": str(LetterKind.BELOW_SHARE), **detail}
    kind = str(LetterKind.BELOW_SHARE)
    aid = state.accumulator_id
    dead_letter(session, "flush", payload, why, utcnow(), accumulator_id=aid, kind=kind)
    log.warning("reconcile.held", accumulator=state.accumulator_id, kind=kind)


def summary(run_id: int, scope: Scope, resumed: bool) -> Summary:
    """The run's counts, by finding and by drifted field."""
    f = T_FINDING.c
    with session_scope() as session:
        run = session.execute(select(T_RUN).where(T_RUN.c.id == run_id)).mappings().one()
        rows = session.execute(select(f.finding, f.fields, f.repaired).where(f.run_id == run_id))
        out = Summary(
            run_id,
            scope.label,
            len(scope.pair_ids),
            run["pairs_done"],
            run["keys_checked"],
            resumed=resumed,
        )
        for finding, fields, repaired in rows:
            out.findings[finding] = out.findings.get(finding, 0) + 1
            out.repaired += bool(repaired)
            for diff in json.loads(fields):
                out.fields[diff["field"]] = out.fields.get(diff["field"], 0) + 1
    return out


def findings(run_id: int) -> list[dict[str, Any]]:
    """Every key the run found not equal, with its key and fields: member data, for the
    operator's file or terminal only."""
    f, a = T_FINDING.c, T_ACCUM.c
    query = (
        select(f.finding, f.fields, f.repaired, *(a[k] for k in KEY_COLS))
        .join(T_ACCUM, a.id == f.accumulator_id)
        .where(f.run_id == run_id)
        .order_by(f.id)
    )
    with session_scope() as session:
        rows = session.execute(query).mappings().all()
    return [
        {k: r[k] for k in KEY_COLS}
        | {"finding": r["finding"], "repaired": r["repaired"], "fields": json.loads(r["fields"])}
        for r in rows
    ]


def run_scheduled(continuing: bool = False) -> dict[str, int]:
    """Beat's reconcile: every pair, report only, for at most SLICE seconds. It resumes the
    unfinished scheduled run, unless that one moved within BUSY seconds (another task runs it)
    and this task is not its own continuation. Counts only: safe for logs and Flower."""
    from worker.settings import get_settings
    from worker.vba.fleet import client

    settings = get_settings()
    with session_scope() as session:
        scope = scope_of(session, every=True)
        if not continuing and (age := _unfinished_age(session, scope)) is not None and age < BUSY:
            log.info("reconcile.busy", seconds_since_progress=round(age))
            return {"run": 0, "left": 0, "skipped": 1}
    runner = Reconcile(client(), settings.ownership, settings.reconcile_rate)
    run_id, resumed = runner.start(scope)
    left = runner.left(run_id, scope)
    finished = runner.run(run_id, left, until=time.monotonic() + SLICE)
    done = summary(run_id, scope, resumed)
    remaining = 0 if finished else len(runner.left(run_id, scope))
    log.info(
        "reconcile.slice",
        run=run_id,
        pairs_done=done.pairs_done,
        left=remaining,
        keys_checked=done.keys_checked,
        drifted=done.drifted,
    )
    return {"run": run_id, "left": remaining, "drifted": done.drifted, "skipped": 0}


def _unfinished_age(session: Session, scope: Scope) -> float | None:
    r = T_RUN.c
    query = select(r.updated_at).where(r.scope_hash == scope.digest, r.finished_at.is_(None))
    moved = session.execute(query.where(r.repair.is_(False)).order_by(r.id.desc())).scalar()
    return None if moved is None else (utcnow() - as_utc(moved)).total_seconds()
