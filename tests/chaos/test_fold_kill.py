"""SIGKILL around the fold (record, then fold: worker/store/fold.py).

The whole worker is killed at each moment the fold adds: inside a fold's transaction (its
batches applied, not committed), inside an ingest's transaction (its versions recorded, not
committed), and between the two (the ingest committed, its message not acknowledged, its batch
not folded). On Postgres, and on the embedded defaults, where the fold runs inside the ingest's
own transaction, so "between" is no moment there and "during the fold" is inside the ingest.
After each kill the worker starts again, armed for the next moment (each moment twice); at the
end every batch is folded once, every total is the sum of its claims, and VBA holds the oracle's
totals to the cent.
"""

from __future__ import annotations

import re
from decimal import Decimal

import pytest

from tests.chaos.conftest import Chaos, distinctive
from tests.chaos.test_postgres_kill import LEDGER_MISMATCHES
from tests.integration.test_flush import own_keys, plus, vba_rows
from tests.stack import remote_totals
from worker.demo.procs import wait_for
from worker.demo.streams import StreamSpec, generate

pytestmark = pytest.mark.chaos

#: The moments, in the order the worker is armed for them, twice each (``:group``: the whole
#: worker dies).
MOMENTS = {
    "postgres": ("ingest.before_commit", "ingest.after_commit", "fold.before_commit") * 2,
    "sqlite": ("ingest.before_commit", "fold.before_commit") * 2,
}
KILLED = re.compile(r"failpoint\.kill\s.*?point=([\w.]+)")


@pytest.mark.parametrize("store", ["postgres", "sqlite"])
def test_killed_around_the_fold_loses_and_doubles_nothing(chaos: Chaos, store: str) -> None:
    """The worker killed twice at each moment of record-then-fold: nothing lost or doubled."""
    sandbox = chaos.vba()
    embedded = store == "sqlite"
    # Leases of 3 s: a killed worker's messages are back within seconds.
    stack = chaos.stack(embedded=embedded, ownership="shared", broker_visibility_timeout="3")
    events = distinctive(generate(StreamSpec(events=600, members=30, seed=83)))
    d13 = Decimal("13.00")  # VBA's own amounts on half the keys: a doubled delta would show
    own = vba_rows(own_keys(events), deductible_Used=d13, ded_PPO_Used=d13)
    sandbox.admin.seed(subscriber=own)
    stack.send(events, batch=30)  # 20 messages, all queued before the first worker starts
    moments = MOMENTS[store]
    concurrency = 1 if embedded else 2
    worker = stack.worker("w", concurrency=concurrency, ACCUMSYNC_FAILPOINT=f"{moments[0]}:group")
    stack.beat()
    killed: list[str] = []
    since = 0
    for n, moment in enumerate(moments, 1):
        assert wait_for(lambda: not worker.alive(), 60, 0.1), f"never reached {moment}"
        killed += KILLED.findall(worker.output()[since:])
        since = len(worker.output())
        if n < len(moments):
            worker.env["ACCUMSYNC_FAILPOINT"] = f"{moments[n]}:group"
        else:
            worker.env.pop("ACCUMSYNC_FAILPOINT")
        worker.start().ready(" ready.", timeout=90, after=since)
    assert killed == list(moments), f"killed at {killed}, meant {list(moments)}"
    chaos.drain(stack, len({e["event_id"] for e in events}), timeout=120)
    unfolded = stack.scalar("SELECT count(*) FROM ingest_batch WHERE folded_at IS NULL")
    mismatches = stack.scalar(LEDGER_MISMATCHES)  # totals that are not the sum of their claims
    versions = stack.scalar("SELECT count(*) FROM received_event WHERE batch_id IS NOT NULL")
    assert (unfolded, mismatches) == (0, 0)
    assert stack.figures()["applied"] + stack.figures()["stale"] == versions
    chaos.finish(
        stack,
        events,
        fault=f"worker SIGKILL around the fold ({store} store)",
        injected="the whole worker killed twice at each moment, in turn: "
        + ", ".join(moments)
        + " (restarted after each); 20 messages of 30 events",
        times=len(moments),
        events_in=len(events),
        expected_plus=lambda expected: plus(remote_totals(own), expected),
        extra={
            "killed_at": killed,
            "batches_unfolded_at_the_end": unfolded,
            "accumulators_not_the_sum_of_their_claims": mismatches,
            "versions_folded": versions,
        },
    )
