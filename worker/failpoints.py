"""Named crash points for fault-injection tests: ``ACCUMSYNC_FAILPOINT=flush.after_put``.

When the variable names a point the code passes, the process kills itself with SIGKILL there:
no cleanup, no bookkeeping, exactly like a machine losing power at that instant. Unset (always,
in production) it costs one dictionary lookup.
"""

from __future__ import annotations

import os
import signal

from worker.logs import Log

log = Log("failpoint")


def hit(name: str) -> None:
    """Die here if ``ACCUMSYNC_FAILPOINT`` names this point."""
    wanted = os.environ.get("ACCUMSYNC_FAILPOINT")
    if wanted and name in wanted.split(","):
        log.warning("failpoint.kill", point=name, pid=os.getpid())
        os.kill(os.getpid(), signal.SIGKILL)
