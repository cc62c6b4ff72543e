"""The operators' periodic work, on ``ACCUMSYNC_FLUSH_QUEUE``: ``accumsync.reconcile`` (beat, at
``ACCUMSYNC_RECONCILE_CRON``) checks every pair against VBA and reports; ``accumsync.prune``
(beat, hourly) deletes audit rows past ``ACCUMSYNC_AUDIT_RETENTION_DAYS``. The work lives in
worker/ops/. Results are counts only."""

from __future__ import annotations

from worker.celery import app
from worker.ops.reconcile import SLICE, run_scheduled
from worker.ops.retention import prune as prune_audit
from worker.settings import get_settings


# A run goes on for as long as its pairs take at its rate (hours, for many pairs): each task
# checks for SLICE seconds, then queues the next, so no task outlives its time limit and a
# worker restart loses at most a pair (the cursor is committed after each).
@app.task(name="accumsync.reconcile", soft_time_limit=SLICE + 300, time_limit=SLICE + 360)
def reconcile(continuing: bool = False) -> dict[str, int]:
    """Reconcile every pair (report only); continue in a new task after SLICE seconds."""
    counts = run_scheduled(continuing)
    if counts["left"]:
        app.send_task("accumsync.reconcile", kwargs={"continuing": True})
    return counts


@app.task(name="accumsync.prune")
def prune() -> dict[str, int]:
    """Delete the audit rows older than the retention (rows deleted per table)."""
    return prune_audit(get_settings())
