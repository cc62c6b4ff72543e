"""Named crash points for fault-injection tests: ``ACCUMSYNC_FAILPOINT=flush.after_put``.

When the variable names a point the code passes, the process kills itself with SIGKILL there:
no cleanup, no bookkeeping, exactly like a machine losing power at that instant. A point may
carry a probability, ``flush.after_put@0.1``, so a chaos run crashes at random passes only.
``ingest.before_commit:sleep=4`` stalls there for 4 seconds instead (a slow transaction, a GC
pause), so a test can line up two workers' transactions; ``broker.after_take:group`` kills the
process's whole group (a worker's main process and its pool: the whole worker). Unset (always,
in production) it costs one dictionary lookup.

Points: ``ingest.before_commit`` (batch applied, transaction not committed),
``ingest.after_commit`` (committed, message not acknowledged), ``flush.after_intent``
(intents durable, PUT not sent), ``flush.after_put`` (PUT answered, nothing recorded),
``fold.before_commit`` (a fold's batches applied to claims and totals, not committed; on
SQLite inside the ingest's transaction), ``broker.after_take`` (a worker's main process has
taken a message from Redis and not yet recorded it as unacknowledged), ``broker.restore``
(inside the restore of an unacknowledged message, its record read, the message not yet back on
its queue), ``reconcile.before_run`` (``accumsync reconcile`` has begun or resumed its run and
checked no pair yet).
"""

from __future__ import annotations

import os
import random
import signal
import time

from worker.logs import Log

log = Log("failpoint")


def armed(name: str, spec: str | None) -> tuple[float, str]:
    """What ``spec`` (``a,b:sleep=2@0.2,c:group``) asks of point ``name``: its probability (1, a
    share, or 0) and its action (``""``: die; ``group``: kill the process group; ``sleep=S``)."""
    for part in (spec or "").split(","):
        point, _, share = part.strip().partition("@")
        point, _, action = point.partition(":")
        if point == name:
            return (float(share) if share else 1.0), action
    return 0.0, ""


def hit(name: str) -> None:
    """Die (or stall) here if ``ACCUMSYNC_FAILPOINT`` names this point and its dice say so."""
    wanted = os.environ.get("ACCUMSYNC_FAILPOINT")
    if not wanted:
        return
    share, action = armed(name, wanted)
    if not share or random.random() >= share:
        return
    if action.startswith("sleep="):
        seconds = float(action.removeprefix("sleep="))
        log.warning("failpoint.sleep", point=name, seconds=seconds, pid=os.getpid())
        time.sleep(seconds)
        return
    log.warning("failpoint.kill", point=name, pid=os.getpid(), whole_group=action == "group")
    if action == "group":
        os.killpg(os.getpgrp(), signal.SIGKILL)
    os.kill(os.getpid(), signal.SIGKILL)
