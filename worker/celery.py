"""The Celery app: broker, queues, task events for Flower, late acks, the start-up schema check.

``celery -A worker worker`` / ``beat`` / ``flower`` find this module by Celery's own convention
(``worker.celery.app``); nothing else imports it but the tasks and the producer. Importing it has
no effect beyond defining the app: the settings are read when its configuration is first needed,
logging is set up by the worker's and beat's start-up signals (and by the CLI), and the broker
fixes are transports of ours named in the configuration (:data:`TRANSPORTS`).

Two queues: ingest on ``ACCUMSYNC_QUEUE``, the flush tasks on ``ACCUMSYNC_FLUSH_QUEUE``, so slow
VBA calls never hold the slots ingest needs, and the reverse. A worker started without ``-Q``
consumes both; compose runs one worker per queue.
"""

from __future__ import annotations

import gc
import logging
from typing import Any, Final

from celery import Celery
from celery.signals import (
    after_setup_logger,
    after_setup_task_logger,
    beat_init,
    task_postrun,
    task_prerun,
    worker_init,
    worker_process_init,
    worker_process_shutdown,
)
from kombu import Queue

from worker import logs
from worker.schedule import beat_schedule
from worker.settings import Settings, get_settings

TASK_MODULES = ["tasks.ingest", "tasks.flush", "tasks.ops"]
FLUSH_TASKS = (
    "accumsync.flush_due",
    "accumsync.flush_pair",
    "accumsync.push_plans",
    "accumsync.reconcile",
    "accumsync.prune",
)

app = Celery("accumsync")


def transport_options(
    broker_url: str,
    visibility_timeout: float = 300.0,
    health_check_interval: float = 10.0,
    consumer_ttl: float = 10.0,
) -> dict[str, Any]:
    """Per-transport options (the embedded broker's are read by worker/sqlbroker.py)."""
    if broker_url.startswith(("redis", "rediss")):
        # A connection that goes silent (NAT entry dropped, failover, partition: no FIN, no RST)
        # must fail, not hang: without a socket timeout a worker waits on it forever, up but not
        # consuming. kombu checks the BRPOP link every ``health_check_interval`` seconds and
        # reconnects; the socket timeout bounds every other command (ack, publish, events).
        link = {
            "health_check_interval": health_check_interval,
            "socket_timeout": health_check_interval + 5,
            "socket_connect_timeout": 5,
            "socket_keepalive": True,
        }
        # Redis redelivers an unacked message (its worker was SIGKILLed, or lost the broker)
        # after ``visibility_timeout``; no countdown of ours is longer, and every task is
        # idempotent, so an early redelivery of a slow task costs time, not correctness.
        # kombu sweeps for such messages every interval * throttle seconds (100 s by default):
        # sweep often enough that the timeout, not the sweep, decides when they come back.
        # A dead worker's messages, taken or recorded, come back after its heartbeat's TTL
        # (worker/redisbroker.py's reliable fetch); the visibility timeout is for a live one's.
        # The restore pass's lock lasts 10 s, not kombu's 300 s: a worker killed inside a pass
        # held every restore up for five minutes (each restore is a transaction of its own, so
        # two passes at once restore nothing twice).
        return {
            "visibility_timeout": visibility_timeout,
            "unacked_restore_interval": max(1.0, min(10.0, visibility_timeout / 10)),
            "unacked_restore_throttle": 1,
            "unacked_mutex_expire": 10.0,
            "consumer_ttl": consumer_ttl,
        } | link
    if broker_url.startswith(("amqp", "pyamqp")):
        # Publisher confirms: each publish waits for RabbitMQ's basic.ack, so a publish the
        # broker never took (connection closed under it, app stopped, a broker-side refusal)
        # raises, and Celery's publish retry or the caller sees it, instead of a silent drop.
        return {"confirm_publish": True}
    if broker_url.startswith("sqla"):
        # Read by worker/sqlbroker.py's channel (which hands none of its own to create_engine).
        return {"visibility_timeout": visibility_timeout}
    return {}


#: Our kombu transports, by broker URL scheme: each fixes what kombu's own loses (named here,
#: never patched into kombu's classes: importing this module changes nothing in the process).
TRANSPORTS = {
    "redis": "worker.redisbroker:Transport",
    "rediss": "worker.redisbroker:Transport",
    "sqla": "worker.sqlbroker:Transport",
}


def broker_of(url: str) -> tuple[str, str]:
    """The URL kombu is given and the transport that serves it: ours, or kombu's by the scheme
    (named, never left to the app's default: a connection to another broker than the app's
    must not take the app's transport).

    The embedded broker's ``sqla+sqlite:///...`` names kombu's transport in its prefix, which
    kombu obeys over any ``transport=``: ours gets the URL without it."""
    scheme = url.split("://", 1)[0]
    prefix, _, rest = url.partition("+")
    if "+" in scheme and prefix in TRANSPORTS:
        return rest, TRANSPORTS[prefix]
    return url, TRANSPORTS.get(scheme, scheme)


def broker(settings: Settings) -> tuple[str, str]:
    """:func:`broker_of` the configured broker (on Redis, kombu's own fetch if
    ``ACCUMSYNC_BROKER_FETCH=kombu``: worker/redisstock.py)."""
    url, transport = broker_of(settings.effective_broker_url)
    if settings.broker_fetch == "kombu" and transport == TRANSPORTS["redis"]:
        return url, "worker.redisstock:Transport"
    return url, transport


def celery_config(settings: Settings) -> dict[str, Any]:
    """The app's configuration for ``settings``: a plain dict, computed, never applied here."""
    url, transport = broker(settings)
    return {
        "broker_url": url,
        "broker_transport": transport,
        "broker_connection_retry_on_startup": True,
        "broker_transport_options": transport_options(
            settings.effective_broker_url,
            settings.broker_visibility_timeout,
            settings.broker_health_check_interval,
            settings.broker_consumer_ttl,
        ),
        # On a lost broker connection, running tasks are cancelled rather than finished
        # unacknowledgeable: their messages come back (acks_late) and every task is idempotent.
        "worker_cancel_long_running_tasks_on_connection_loss": True,
        "task_default_queue": settings.queue,
        "task_queues": [Queue(settings.queue), Queue(settings.effective_flush_queue)],
        "task_routes": {name: {"queue": settings.effective_flush_queue} for name in FLUSH_TASKS},
        "task_serializer": "json",
        "accept_content": ["json"],
        "result_serializer": "json",
        "task_ignore_result": True,
        # Ack after the transaction commits; a killed worker's message is delivered again.
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        # Flower sees every task; arguments are opaque (argsrepr), never member data.
        "worker_send_task_events": True,
        "task_send_sent_event": True,
        "worker_hijack_root_logger": False,
        # A message no task can run becomes a dead letter (source broker), never a log line
        # carrying its body: worker/ingest/undeliverable.py (by name: no import upward).
        "worker_consumer": "worker.ingest.undeliverable:Consumer",
        "timezone": "UTC",
        "enable_utc": True,
        "include": TASK_MODULES,
        "beat_schedule": beat_schedule(settings),
    }


def configure(settings: Settings) -> None:
    """Point the app at other settings (tests, the demo and the benchmarks switch brokers)."""
    app.conf.update(celery_config(settings))


# Read from the environment when the app's configuration is first needed (a worker starting, a
# first publish), not at import: importing the producer creates no file and no log handler.
app.add_defaults(lambda: celery_config(get_settings()))


@worker_init.connect
@beat_init.connect
def _our_log_lines(**_: Any) -> None:
    """A worker or beat writes accumsync's lines in the configured format (the CLI does the same
    for its commands; a process that only imports the producer gets no handler of ours)."""
    settings = get_settings()
    logs.configure(settings.log_format, settings.log_level)


@task_prerun.connect
def _lines_name_the_task(task_id: str, task: Any, **_: Any) -> None:
    """A task's log lines carry its id and name, as Flower shows them (worker/logs.py)."""
    logs.bind_task(task_id, task.name)


@task_postrun.connect
def _task_done(**_: Any) -> None:
    logs.unbind_task()


@after_setup_logger.connect
@after_setup_task_logger.connect
def _celery_lines_too(logger: logging.Logger, **_: Any) -> None:
    """With ACCUMSYNC_LOG_FORMAT=json, Celery's own lines (received, succeeded, ready) are JSON."""
    logs.reformat(logger, get_settings().log_format)


@worker_init.connect
def _refuse_unmigrated(**_: Any) -> None:
    """A worker exits before it consumes anything, naming what to do, when the store's schema is
    not its own: behind it (run ``accumsync db upgrade``) or newer (this worker is older than
    the schema: upgrade it). Beat is not checked: it never opens the store."""
    from worker.db import SchemaMismatch, check_migrated

    try:
        check_migrated()
    except SchemaMismatch as exc:
        raise SystemExit(f"accumsync: {exc}") from None


GC_YOUNG: Final = 20_000
"""Allocations between two collections of the youngest generation in a pool process (Python's
default: 700)."""


@worker_process_init.connect
def _fresh_pool(**_: Any) -> None:
    """A forked pool process must not share its parent's database connections; and it collects
    cycles less often, never rescanning what it inherited. A batch allocates a few objects per
    event, nearly all freed by their reference counts, yet at Python's default threshold the
    collector ran every 700 allocations and now and then walked the whole heap of Celery,
    SQLAlchemy and pydantic: a fifth of a batch's Python time (bench/README.md, finding 19)."""
    from worker.db import reset_engine

    reset_engine()
    gc.freeze()  # what the process inherited is never garbage: out of every collection
    gc.set_threshold(GC_YOUNG, *gc.get_threshold()[1:])


@worker_process_shutdown.connect
def _fold_before_exit(**_: Any) -> None:
    """A pool process that stops folds what it was about to (worker/store/fold.py, ``Soon``),
    so a stopped worker leaves no batch of its own waiting (for a downgrade, say: migration 0014
    refuses while one waits)."""
    from worker.store.fold import PROCESS_FOLD

    PROCESS_FOLD.now()
