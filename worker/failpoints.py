"""Named crash points for fault-injection tests: ``ACCUMSYNC_FAILPOINT=flush.after_put``.

When the variable names a point the code passes, the process kills itself with SIGKILL there:
no cleanup, no bookkeeping, exactly like a machine losing power at that instant. A point may
carry a probability, ``flush.after_put@0.1``, so a chaos run crashes at random passes only.
``ingest.before_commit:sleep=4`` stalls there for 4 seconds instead (a slow transaction, a GC
pause), so a test can line up two workers' transactions. Unset (always, in production) it
costs one dictionary lookup.

Points: ``ingest.before_commit`` (batch applied, transaction not committed),
``ingest.after_commit`` (committed, message not acknowledged), ``flush.after_intent``
(intents durable, PUT not sent), ``flush.after_put`` (PUT answered, nothing recorded).
"""

from __future__ import annotations

import os
import random
import signal
import time

from worker.logs import Log

log = Log("failpoint")


def armed(name: str, spec: str | None) -> tuple[float, float | None]:
    """What ``spec`` (``a,b:sleep=2@0.2``) asks of point ``name``: its probability (1, a share,
    or 0) and the seconds to sleep there (None: die)."""
    for part in (spec or "").split(","):
        point, _, share = part.strip().partition("@")
        point, _, action = point.partition(":")
        if point == name:
            sleep = float(action.removeprefix("sleep=")) if action.startswith("sleep=") else None
            return (float(share) if share else 1.0), sleep
    return 0.0, None


def hit(name: str) -> None:
    """Die (or stall) here if ``ACCUMSYNC_FAILPOINT`` names this point and its dice say so."""
    wanted = os.environ.get("ACCUMSYNC_FAILPOINT")
    if not wanted:
        return
    share, sleep = armed(name, wanted)
    if not share or random.random() >= share:
        return
    if sleep is not None:
        log.warning("failpoint.sleep", point=name, seconds=sleep, pid=os.getpid())
        time.sleep(sleep)
        return
    log.warning("failpoint.kill", point=name, pid=os.getpid())
    os.kill(os.getpid(), signal.SIGKILL)
