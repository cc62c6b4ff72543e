"""The Celery app: broker, queues, task events for Flower, late acks, the start-up schema check.

``celery -A worker worker`` / ``beat`` / ``flower`` find this module by Celery's own convention
(``worker.celery.app``); nothing else imports it but the tasks and the producer.

Two queues: ingest on ``ACCUMSYNC_QUEUE``, the flush tasks on ``ACCUMSYNC_FLUSH_QUEUE``, so slow
VBA calls never hold the slots ingest needs, and the reverse. A worker started without ``-Q``
consumes both; compose runs one worker per queue.
"""

from __future__ import annotations

import logging
from typing import Any

from celery import Celery
from celery.signals import (
    after_setup_logger,
    after_setup_task_logger,
    worker_init,
    worker_process_init,
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
    broker_url: str, visibility_timeout: float = 300.0, health_check_interval: float = 10.0
) -> dict[str, Any]:
    """Per-transport options: kombu passes SQLAlchemy's straight to ``create_engine``."""
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
        return {
            "visibility_timeout": visibility_timeout,
            "unacked_restore_interval": max(1.0, min(10.0, visibility_timeout / 10)),
            "unacked_restore_throttle": 1,
        } | link
    if broker_url.startswith(("amqp", "pyamqp")):
        # Publisher confirms: each publish waits for RabbitMQ's basic.ack, so a publish the
        # broker never took (connection closed under it, app stopped, a broker-side refusal)
        # raises, and Celery's publish retry or the caller sees it, instead of a silent drop.
        return {"confirm_publish": True}
    return {}


def configure(settings: Settings) -> None:
    """Point the app at the configured broker; called at import and by tests that switch."""
    app.conf.update(
        broker_url=settings.effective_broker_url,
        broker_connection_retry_on_startup=True,
        broker_transport_options=transport_options(
            settings.effective_broker_url,
            settings.broker_visibility_timeout,
            settings.broker_health_check_interval,
        ),
        # On a lost broker connection, running tasks are cancelled rather than finished
        # unacknowledgeable: their messages come back (acks_late) and every task is idempotent.
        worker_cancel_long_running_tasks_on_connection_loss=True,
        task_default_queue=settings.queue,
        task_queues=[Queue(settings.queue), Queue(settings.effective_flush_queue)],
        task_routes={name: {"queue": settings.effective_flush_queue} for name in FLUSH_TASKS},
        task_serializer="json",
        accept_content=["json"],
        result_serializer="json",
        task_ignore_result=True,
        # Ack after the transaction commits; a killed worker's message is delivered again.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        # Flower sees every task; arguments are opaque (argsrepr), never member data.
        worker_send_task_events=True,
        task_send_sent_event=True,
        worker_hijack_root_logger=False,
        # A message no task can run becomes a dead letter (source broker), never a log line
        # carrying its body: worker/ingest/undeliverable.py (by name: no import upward).
        worker_consumer="worker.ingest.undeliverable:Consumer",
        timezone="UTC",
        enable_utc=True,
        include=TASK_MODULES,
        beat_schedule=beat_schedule(settings),
    )
    if settings.effective_broker_url.startswith(("redis", "rediss")):
        _consume_on_when_redis_is_full()
    if settings.effective_broker_url.startswith("sqla"):
        _poll_sql_broker_every(0.03)
        _lease_sql_broker_messages(settings.broker_visibility_timeout)
    logs.configure(settings.log_format, settings.log_level)


def _consume_on_when_redis_is_full() -> None:
    """A full Redis refuses kombu's record of a taken message and stops the worker, losing the
    message; worker/redisbroker.py's QoS runs it instead (set on the class, as below)."""
    from kombu.transport import redis

    from worker.redisbroker import FullSafeQoS

    redis.Channel.QoS = FullSafeQoS


def _poll_sql_broker_every(seconds: float) -> None:
    """The embedded broker is polled, by default once a second: with prefetch 1 that is one task
    per second. Every 0.03 s the embedded flush reaches VBA's 25 calls/s (at 0.1 s it made 9.5,
    at 0.05 s 18); an idle worker's main process then spends about 8% of a core polling (2% at
    0.1 s), measured with bench.flush's embedded phase. A larger prefetch would be faster still,
    but this transport loses a prefetched, unacknowledged message when its worker is killed.

    Celery's ``broker_polling_interval`` does not reach kombu's virtual transports, and this
    transport hands every transport option to ``create_engine`` (which refuses
    ``polling_interval``), so the transport's class attribute is the one place to set it."""
    from kombu.transport import sqlalchemy

    sqlalchemy.Transport.polling_interval = seconds


def _lease_sql_broker_messages(visibility_timeout: float) -> None:
    """kombu's SQL transport loses a message its worker took and died holding; the channel of
    worker/sqlbroker.py leases it instead, as Redis does (set on the class, for the reason
    above)."""
    from kombu.transport import sqlalchemy

    from worker.sqlbroker import LeasedChannel

    LeasedChannel.visibility_timeout = visibility_timeout
    sqlalchemy.Transport.Channel = LeasedChannel


configure(get_settings())


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


@worker_process_init.connect
def _fresh_pool(**_: Any) -> None:
    """A forked pool process must not share its parent's database connections."""
    from worker.db import reset_engine

    reset_engine()
