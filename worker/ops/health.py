"""``accumsync health``: healthy means making progress, not merely having a live PID.

Three checks, each with a reason an operator can act on:
- the oldest accumulator waiting for its flush is younger than ``health_max_dirty_age``;
- while work waits, a batch call to VBA succeeded within ``health_max_flush_age`` (measured from
  the later of the last success and the oldest waiting change, so an idle system stays green);
- the broker queue's backlog is not growing across a few samples (workers keep up);
- while messages wait in the queue, some task made progress (an ingested batch or a batch call)
  within ``health_max_idle``: a worker that stays up but stopped consuming after a broker blip
  (a known Celery failure mode) turns this red even when the backlog is flat;
- VBA did not answer 403 since the last successful batch call (a revoked key, a gateway rule:
  configuration, not data; calls pause fleet-wide and nothing is dead-lettered);
- one celery beat ticks: some beat queued a scheduled flush within 3 flush intervals
  (``beat_silence``, at least 5 s), and no two beats ticked at once (a store that never saw a
  tick says so and stays green: the other checks judge a deployment that never ran beat);
- no accumulator is held for an operator: a write of unknown outcome that VBA's own write has
  since hidden (ambiguous), or a VBA row below our confirmed share. Nothing flushes those keys
  until someone runs ``accumsync dead-letters resolve``.
Dead-lettered accumulators are excluded: they wait for a person (``dead-letters``), not a flush.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from datetime import datetime
from itertools import pairwise
from typing import Any

from sqlalchemy import select
from sqlmodel import Session

from models.sync import HOLDS
from worker.db import age_seconds, as_utc, clock, session_scope, utcnow
from worker.ops.queries import held, open_dead_letters, waiting_for_flush
from worker.settings import Settings, get_settings
from worker.store import counters
from worker.store.fold import oldest_unfolded
from worker.store.tables import T_BEAT

SUCCESS = ("ok", "partial", "recovered")


@dataclass(frozen=True)
class Limits:
    """Thresholds of one health check run."""

    max_dirty_age: float
    max_flush_age: float
    max_idle: float = 300.0
    beat_silence: float = 180.0
    samples: int = 3
    interval: float = 1.0

    @classmethod
    def of(cls, settings: Settings, **overrides: Any) -> Limits:
        given = {k: v for k, v in overrides.items() if v is not None}
        defaults = {
            "max_dirty_age": settings.health_max_dirty_age,
            "max_flush_age": settings.health_max_flush_age,
            "max_idle": settings.health_max_idle,
            "beat_silence": beat_silence(settings),
        }
        return cls(**(defaults | given))


@dataclass
class Check:
    """One check's verdict, with the figure it judged."""

    name: str
    ok: bool
    value: float | list[int] | None
    limit: float | None
    reason: str


@dataclass
class HealthReport:
    """All checks; healthy when every one is ok."""

    checks: list[Check] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def healthy(self) -> bool:
        return all(c.ok for c in self.checks)

    def as_dict(self) -> dict[str, Any]:
        return {"healthy": self.healthy, "checks": [asdict(c) for c in self.checks]} | {
            "info": self.info
        }


def _age(since: datetime | None, now: datetime) -> float | None:
    return age_seconds(since, now, places=1)


def last_success(session: Session) -> datetime | None:
    """When a batch call to VBA last succeeded (a 207, whatever its items said)."""
    return counters.last(session, prefix=tuple(f"calls.{outcome}." for outcome in SUCCESS))


def last_progress(session: Session) -> datetime | None:
    """When a task last made progress: an ingested batch or any batch call to VBA."""
    return counters.last(session, prefix=("events.received", "calls."))


def access_check(session: Session, limits: Limits, now: datetime) -> Check:
    """VBA (or its gateway) answered 403 since the last successful batch call: a revoked or
    wrong API key, a gateway rule. Every process pauses its calls; nothing is dead-lettered."""
    forbidden = counters.last(session, "vba_403")
    success = last_success(session)
    age = _age(forbidden, now)
    refused = (
        age is not None
        and age <= limits.max_flush_age
        and (success is None or as_utc(success) < as_utc(forbidden))  # type: ignore[arg-type]
    )
    reason = (
        f"VBA answered 403 Forbidden {age:.0f}s ago and no batch call succeeded since: check "
        "ACCUMSYNC_VBA_API_KEY, ACCUMSYNC_VBA_DATABASE and the gateway's rules; VBA calls "
        "are paused fleet-wide meanwhile"
        if refused
        else "VBA accepts our credentials"
    )
    return Check("vba_access", not refused, age, limits.max_flush_age, reason)


def fold_check(session: Session, limits: Limits, now: datetime) -> Check:
    """Batches recorded and not folded into the totals: a change waits for its fold as it waits
    for its flush, so the same limit holds (a fold that keeps failing shows here first)."""
    count, oldest = oldest_unfolded(session)
    age = _age(oldest, now) or 0.0
    reason = (
        f"{count} ingest batches wait for the fold, the oldest for {age:.0f}s: every worker "
        "folds its batches within ACCUMSYNC_FOLD_DELAY, the dispatcher every round and beat "
        "every tick; their logs name a fold that fails (fold.failed, fold.crashed)"
        if count
        else "every batch received is in the totals"
    )
    return Check("fold", age <= limits.max_dirty_age, age, limits.max_dirty_age, reason)


def holds_check(session: Session) -> Check:
    """Keys waiting for a person's decision (an ambiguous outcome, a row below our share)."""
    waiting_for_people = {k: n for k, n in held(session).items() if k in HOLDS}
    count = sum(waiting_for_people.values())
    kinds = ", ".join(f"{n} {k}" for k, n in sorted(waiting_for_people.items()))
    reason = (
        f"{count} accumulators held for an operator ({kinds}): check VBA, then "
        "`accumsync dead-letters resolve ID --landed|--not-landed`"
        if count
        else "no accumulator waits for an operator's decision"
    )
    return Check("holds", count == 0, count, None, reason)


def beat_silence(settings: Settings) -> float:
    """Seconds without a beat tick that mean no beat runs: three flush intervals (at least 5 s,
    as ``queued_for``: a tick a moment late is not a dead beat)."""
    return max(3 * settings.flush_interval, 5.0)


@dataclass(frozen=True)
class Beats:
    """What the store says of celery beat: seconds since any beat last ticked (None: never),
    and the beats running now (``host:pid``; two or more is a mistake)."""

    last_tick_age: float | None
    running: list[str]


def beats(session: Session, silence: float) -> Beats:
    """Beats that ticked within ``silence`` seconds; of those, every one that ticked while
    another did (two beats at once), else the latest (a restarted beat follows its dead self)."""
    now = clock(session)
    rows = session.execute(select(T_BEAT.c.beat, T_BEAT.c.first_at, T_BEAT.c.last_at)).all()
    spans = [(str(b), as_utc(first), as_utc(last)) for b, first, last in rows]
    if not spans:
        return Beats(None, [])
    latest = max(spans, key=lambda span: span[2])
    live = [span for span in spans if (now - span[2]).total_seconds() <= silence]
    together = sorted(
        {a[0] for a in live for b in live if a[0] != b[0] and min(a[2], b[2]) > max(a[1], b[1])}
    )
    running = together or ([latest[0]] if latest in live else [])
    return Beats(age_seconds(latest[2], now, places=1), running)


def dispatcher_check(session: Session) -> Check:
    """The leading dispatcher, named. None is no fault, only slower: beat's sweep flushes every
    interval."""
    from worker.flush.dispatch import leader

    lead = leader(session)
    if lead is None:
        return Check(
            "dispatcher", True, None, None, "none leads: each flush waits for beat's next tick"
        )
    return Check("dispatcher", True, None, None, f"leading: {lead['host']}:{lead['pid']}")


def beat_check(session: Session, limits: Limits) -> Check:
    """Exactly one beat ticks: none lately means no flush is scheduled; two double every
    scheduled task (no money: each flush is fenced by its pair's lease)."""
    seen = beats(session, limits.beat_silence)
    age, running = seen.last_tick_age, seen.running
    if len(running) > 1:
        reason = f"{len(running)} beats are running: {', '.join(running)}; run exactly one"
    elif age is None:
        reason = "no beat tick recorded yet"
    elif not running:
        reason = f"no beat tick for {age:.0f}s; is celery beat running?"
    else:
        reason = f"one beat ticking ({running[0]}), last tick {age:.0f}s ago"
    ok = len(running) == 1 or age is None
    return Check("beat", ok, age, limits.beat_silence, reason)


def queue_lengths(settings: Settings | None = None) -> dict[str, int]:
    """Messages waiting in each of the two queues, ingest and flush (Redis lists, AMQP queues,
    or kombu's SQL table)."""
    from worker.celery import app, broker

    settings = settings or get_settings()
    url, transport = broker(settings)
    with app.connection_for_read(url, transport=transport) as conn:
        conn.ensure_connection(max_retries=2, interval_start=0, interval_step=1)
        channel: Any = conn.default_channel  # kombu's stubs omit queue_declare
        queues = (settings.queue, settings.effective_flush_queue)
        return {queue: _waiting(channel, queue) for queue in queues}


def _waiting(channel: Any, queue: str) -> int:
    from amqp.exceptions import ChannelError

    try:
        ok = channel.queue_declare(queue=queue, passive=True)
    except ChannelError as exc:
        if str(getattr(exc, "reply_code", "")) == "404":  # never declared: nothing waits
            return 0
        raise
    return int(ok.message_count)


def queue_length(settings: Settings | None = None) -> int:
    """Messages waiting in both queues."""
    return sum(queue_lengths(settings).values())


def store_checks(session: Session, limits: Limits, now: datetime) -> HealthReport:
    """The two progress checks read from the store."""
    report = HealthReport()
    count, oldest = waiting_for_flush(session)
    dirty_age = _age(oldest, now) or 0.0
    report.checks.append(
        Check(
            "oldest_dirty",
            dirty_age <= limits.max_dirty_age,
            dirty_age,
            limits.max_dirty_age,
            f"{count} accumulators wait for a flush, the oldest for {dirty_age:.0f}s",
        )
    )
    last = last_success(session)
    since = max((t for t in (last, oldest) if t is not None), default=None, key=as_utc)
    flush_age = (_age(since, now) or 0.0) if count else 0.0
    what = f"last successful batch call {_age(last, now)}s ago" if last else "no successful call"
    report.checks.append(
        Check(
            "last_flush",
            flush_age <= limits.max_flush_age,
            flush_age,
            limits.max_flush_age,
            f"{what}; {count} accumulators waiting" if count else f"{what}; nothing waiting",
        )
    )
    report.checks.append(fold_check(session, limits, now))
    report.checks.append(holds_check(session))
    report.checks.append(access_check(session, limits, now))
    report.checks.append(beat_check(session, limits))
    report.checks.append(dispatcher_check(session))
    report.info = {"waiting": count, "open_dead_letters": sum(open_dead_letters(session).values())}
    report.info["last_progress_age_s"] = _age(last_progress(session), now)
    return report


def sample_queue(limits: Limits, settings: Settings) -> list[int]:
    """The queue's length, ``limits.samples`` times, ``limits.interval`` seconds apart."""
    samples = []
    for i in range(limits.samples):
        if i:
            time.sleep(limits.interval)
        samples.append(queue_length(settings))
    return samples


def backlog_check(limits: Limits, settings: Settings, samples: list[int]) -> Check:
    """Growing at every sample means the workers fall behind."""
    growing = len(samples) > 1 and all(b > a for a, b in pairwise(samples))
    queues = f"{settings.queue!r} and {settings.effective_flush_queue!r}"
    reason = f"queues {queues}: messages over {limits.samples} samples: {samples}"
    return Check("backlog", not growing, samples, None, reason + (" (growing)" if growing else ""))


def consuming_check(limits: Limits, samples: list[int], progress_age: float | None) -> Check:
    """Messages wait at every sample yet no task made progress lately: nobody is consuming."""
    waiting_msgs = min(samples, default=0)
    idle = progress_age if progress_age is not None else float("inf")
    stalled = waiting_msgs > 0 and idle > limits.max_idle
    since = "never" if progress_age is None else f"{progress_age:.0f}s ago"
    reason = f"{waiting_msgs} messages wait; last task progress {since}"
    return Check(
        "consuming",
        not stalled,
        progress_age,
        limits.max_idle,
        reason + (" (workers are not consuming)" if stalled else ""),
    )


def check(limits: Limits, settings: Settings | None = None) -> HealthReport:
    """Run every check; an unreachable store or broker is itself a failed check."""
    settings = settings or get_settings()
    try:
        with session_scope() as session:
            report = store_checks(session, limits, utcnow())
    except Exception as exc:
        report = HealthReport([Check("store", False, None, None, _name(exc))])
    try:
        samples = sample_queue(limits, settings)
        report.checks.append(backlog_check(limits, settings, samples))
        if "last_progress_age_s" in report.info:
            age = report.info["last_progress_age_s"]
            report.checks.append(consuming_check(limits, samples, age))
    except Exception as exc:
        report.checks.append(Check("broker", False, None, None, _name(exc)))
    return report


def _name(exc: Exception) -> str:
    """What is wrong and what to fix (the password masked), on one line; else the type only: a
    driver's message can carry a URL with a password in it."""
    from worker.problems import problem_of

    problem = problem_of(exc)
    return problem.replace("\n", "; ") if problem else type(exc).__name__
