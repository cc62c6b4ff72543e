"""Named crash points for fault-injection tests: ``ACCUMSYNC_FAILPOINT=flush.after_put``.

When the variable names a point the code passes, the process kills itself with SIGKILL there:
no cleanup, no bookkeeping, exactly like a machine losing power at that instant. A point may
carry a probability, ``flush.after_put@0.1``, so a chaos run crashes at random passes only.
Unset (always, in production) it costs one dictionary lookup.

Points: ``ingest.before_commit`` (batch applied, transaction not committed),
``ingest.after_commit`` (committed, message not acknowledged), ``flush.after_intent``
(intents durable, PUT not sent), ``flush.after_put`` (PUT answered, nothing recorded).
"""

from __future__ import annotations

import os
import random
import signal

from worker.logs import Log

log = Log("failpoint")


def armed(name: str, spec: str | None) -> float:
    """The probability ``spec`` gives point ``name`` (``a,b@0.2``): 1, a share, or 0."""
    for part in (spec or "").split(","):
        point, _, share = part.strip().partition("@")
        if point == name:
            return float(share) if share else 1.0
    return 0.0


def hit(name: str) -> None:
    """Die here if ``ACCUMSYNC_FAILPOINT`` names this point (and its dice say so)."""
    wanted = os.environ.get("ACCUMSYNC_FAILPOINT")
    if not wanted:
        return
    share = armed(name, wanted)
    if share and random.random() < share:
        log.warning("failpoint.kill", point=name, pid=os.getpid())
        os.kill(os.getpid(), signal.SIGKILL)
