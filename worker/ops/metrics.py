"""``accumsync metrics``: Prometheus text read from durable sources at every scrape.

Workers' in-memory counters are invisible to another process, so every figure here comes from the
store (``ingest_batch``, ``flush_attempt``, ``accumulator``, ``dead_letter``, ``event_counter``)
or the broker (queue length). Any number of metrics processes may run; they hold no state.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlmodel import Session

from models.ledger import Kind
from models.sync import HOLDS
from worker.db import age_seconds, session_scope, utcnow
from worker.ops import health
from worker.ops.queries import held, open_dead_letters
from worker.ops.reports import status
from worker.settings import get_settings
from worker.store import counters


def item_statuses(session: Session) -> Counter[str]:
    """207 item outcomes by status, over every batch call (the counters)."""
    return Counter(
        {k.removeprefix("items."): n for k, n in counters.read(session, "items.").items()}
    )


def batch_calls(session: Session) -> dict[tuple[str, str], int]:
    """Batch calls by (outcome, HTTP status); a call that never got an answer has status ''."""
    calls = {}
    for name, n in counters.read(session, "calls.").items():
        outcome, _, http = name.removeprefix("calls.").partition(".")
        calls[(outcome, "" if http == "none" else http)] = n
    return calls


def snapshot(session: Session) -> dict[str, Any]:
    """Every figure, as plain values (also what ``accumsync metrics --once`` prints)."""
    now = utcnow()
    last = health.last_success(session)
    beats = health.beats(session, health.beat_silence(get_settings()))
    return {
        "status": status(session, now),
        "last_success_age_s": age_seconds(last, now, places=1),
        "last_progress_age_s": age_seconds(health.last_progress(session), now, places=1),
        "items": dict(item_statuses(session)),
        "calls": batch_calls(session),
        "dead_letters": open_dead_letters(session),
        "held": held(session),
        "counters": counters.read(session),
        "beats_running": len(beats.running),
        "last_beat_tick_age_s": beats.last_tick_age,
    }


def families(values: dict[str, Any], lengths: dict[str, int] | None) -> Iterator[Metric]:
    """The Prometheus metric families of a :func:`snapshot`."""
    s = values["status"]
    events = CounterMetricFamily(
        "accumsync_events", "ClaimEvents by ingest outcome", labels=["outcome"]
    )
    for kind in Kind:
        events.add_metric([kind.value], s[kind.value])
    yield events
    dead = GaugeMetricFamily("accumsync_dead_letters", "Open dead letters", labels=["source"])
    for source, n in values["dead_letters"].items():
        dead.add_metric([source], n)
    yield dead
    held = GaugeMetricFamily(
        "accumsync_held_accumulators",
        "Keys held out of flushes by an open dead letter, by kind (ambiguous and below_share "
        "wait for an operator)",
        labels=["kind"],
    )
    for letter_kind in sorted(set(values["held"]) | set(HOLDS)):
        held.add_metric([letter_kind], values["held"].get(letter_kind, 0))
    yield held
    yield GaugeMetricFamily("accumsync_accumulators", "Accumulator keys", value=s["accumulators"])
    yield GaugeMetricFamily(
        "accumsync_batches_waiting_for_fold",
        "Ingest batches recorded and not folded into the totals yet",
        value=s["waiting_for_fold"],
    )
    yield GaugeMetricFamily(
        "accumsync_waiting_accumulators",
        "Keys waiting for a flush (held keys excluded)",
        value=s["waiting_for_flush"],
    )
    yield GaugeMetricFamily(
        "accumsync_oldest_dirty_age_seconds",
        "Age of the oldest change not yet flushed",
        value=s["oldest_waiting_age_s"],
    )
    if values["last_success_age_s"] is not None:
        yield GaugeMetricFamily(
            "accumsync_last_flush_age_seconds",
            "Seconds since a batch call last succeeded",
            value=values["last_success_age_s"],
        )
    if values["last_progress_age_s"] is not None:
        yield GaugeMetricFamily(
            "accumsync_last_progress_age_seconds",
            "Seconds since a task last made progress (an ingested batch or a batch call)",
            value=values["last_progress_age_s"],
        )
    yield GaugeMetricFamily(
        "accumsync_beats_running",
        "Celery beats ticking now (health's beat check: 1 is right, 2 or more double the schedule)",
        value=values["beats_running"],
    )
    if values["last_beat_tick_age_s"] is not None:
        yield GaugeMetricFamily(
            "accumsync_last_beat_tick_age_seconds",
            "Seconds since a celery beat last queued a scheduled flush",
            value=values["last_beat_tick_age_s"],
        )
    calls = CounterMetricFamily(
        "accumsync_vba_batch_calls",
        "Batch PUTs to VBA by outcome and HTTP status",
        labels=["outcome", "status"],
    )
    for (outcome, http), n in sorted(values["calls"].items()):
        calls.add_metric([outcome, http], n)
    yield calls
    items = CounterMetricFamily(
        "accumsync_vba_batch_items", "207 item outcomes by item status", labels=["status"]
    )
    for item_status, n in sorted(values["items"].items()):
        items.add_metric([item_status], n)
    yield items
    c = values["counters"]
    yield CounterMetricFamily("accumsync_vba_429", "429 answers seen from VBA", value=c["vba_429"])
    yield CounterMetricFamily("accumsync_vba_401", "401 answers seen from VBA", value=c["vba_401"])
    yield CounterMetricFamily(
        "accumsync_vba_403", "403 answers seen from VBA or its gateway", value=c["vba_403"]
    )
    yield CounterMetricFamily(
        "accumsync_vba_token_refreshes", "Id tokens refreshed", value=c["vba_token_refreshes"]
    )
    yield CounterMetricFamily("accumsync_vba_logins", "Logins to VBA", value=c["vba_logins"])
    if lengths is not None:
        length = GaugeMetricFamily(
            "accumsync_queue_length", "Messages waiting in a broker queue", labels=["queue"]
        )
        for queue, waiting in lengths.items():
            length.add_metric([queue], waiting)
        yield length


class StoreCollector(Collector):
    """Reads the store and the broker at each scrape; a failed read is an ``up`` of 0."""

    def collect(self) -> Iterator[Metric]:
        settings = get_settings()
        try:
            with session_scope() as session:
                values = snapshot(session)
        except Exception:
            yield GaugeMetricFamily("accumsync_store_up", "The store answered", value=0)
            return
        yield GaugeMetricFamily("accumsync_store_up", "The store answered", value=1)
        try:
            lengths: dict[str, int] | None = health.queue_lengths(settings)
        except Exception:
            lengths = None
        yield GaugeMetricFamily(
            "accumsync_broker_up", "The broker answered", value=int(lengths is not None)
        )
        yield from families(values, lengths)


def registry() -> CollectorRegistry:
    """A registry holding only accumsync's collector (no process metrics of the CLI itself)."""
    reg = CollectorRegistry(auto_describe=False)
    reg.register(StoreCollector())
    return reg


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        """Scrapes every few seconds: no access log."""


def server(host: str, port: int) -> WSGIServer:
    """A WSGI server answering ``/metrics`` (any path, like prometheus-client's own)."""
    return make_server(host, port, make_wsgi_app(registry()), handler_class=_QuietHandler)
