"""The store goes silent: a network partition between the workers (and beat) and Postgres, mid
ingest and flush, and the connections open across it never come back (a dropped NAT entry)."""

from __future__ import annotations

import re
import time

import pytest
from sqlalchemy import make_url

from tests.chaos import blackhole
from tests.chaos.blackhole import Blackhole
from tests.chaos.conftest import Chaos, distinctive, store_away
from tests.chaos.netfault import Relay
from worker.demo.procs import wait_for
from worker.demo.streams import StreamSpec, generate

pytestmark = pytest.mark.chaos

#: Seconds the partition lasts; then new connections pass and the old ones stay dead.
PARTITION = 10.0

#: The store's link timeouts, short for the test (defaults 30 s and 10 s): a silent connection
#: is given up after 6 s, a connection attempt into the partition after 3 s.
LINK = {"db_link_timeout": "6", "db_connect_timeout": "3"}

#: The wave under the partition is published in batches of SMALL every GAP seconds, in a thread.
SMALL, GAP = 10, 0.1


def tally(logs: str) -> dict[str, int]:
    """What the workers and beat said about the store while it was away."""
    return store_away(logs) | {
        "tasks_raised": len(re.findall(r"Task accumsync\.\w+\[[^\]]+\] raised unexpected", logs)),
        "link_timeouts_logged": logs.count("Connection timed out")
        + logs.count("connection timeout expired"),
    }


@pytest.mark.skipif(not blackhole.available(), reason="needs iptables (root, CAP_NET_ADMIN)")
def test_store_partition_drops_dead_connections_and_loses_nothing(chaos: Chaos) -> None:
    """Postgres partitioned away for 10 s mid-run, its open connections dead for good: the
    workers and beat give them up, reconnect and consume again; totals exact."""
    chaos.vba()
    relay = Relay(make_url(chaos.pg_url).port or 5432).start()
    hole = Blackhole(relay.port)
    chaos.exits.callback(relay.stop)
    chaos.exits.callback(hole.close)  # runs first: no rule of ours outlives the test
    url = make_url(chaos.pg_url).set(port=relay.port).render_as_string(hide_password=False)
    stack = chaos.stack(database_url=url, **LINK)
    stack.database_url = chaos.pg_url  # the test reads the store around the relay
    events = distinctive(generate(StreamSpec(events=700, members=40, seed=79)))
    waves = [events[i::3] for i in range(3)]
    workers = [stack.worker("w1", concurrency=2), stack.worker("w2", concurrency=1)]
    beat = stack.beat()
    stack.send(waves[0], batch=25)
    sending = stack.trickle(waves[1], SMALL, GAP)
    time.sleep(1.5)  # ingest of both waves under way, flushes running
    went = time.monotonic()
    hole.partition()
    time.sleep(PARTITION)
    hole.heal()
    healed = time.monotonic()
    sending.join()
    probe = dict(waves[1][0], event_id="probe-0")
    sent = len({e["event_id"] for e in [*waves[0], *waves[1], probe]})
    before = stack.received()
    stack.send([probe])
    resumed = wait_for(lambda: stack.received() > before, 60, 0.2)
    assert resumed, (
        f"nothing recorded in the 60 s after the partition healed: {stack.received()} of {sent} "
        f"events recorded\n{stack.logs()[-5000:]}"
    )
    consuming = round(time.monotonic() - healed, 1)
    # Every event published so far recorded: no worker stuck behind an orphaned transaction.
    assert wait_for(lambda: stack.received() >= sent, 120, 0.2), (
        f"120 s after consuming again: {stack.received()} of {sent} events recorded\n"
        f"{stack.logs()[-5000:]}"
    )
    caught_up = round(time.monotonic() - healed, 1)
    stack.send(waves[2], batch=50)
    valid = [*events, probe]
    chaos.drain(stack, len({e["event_id"] for e in valid}), timeout=120)
    assert all(w.alive() for w in workers) and beat.alive(), stack.logs()[-8000:]
    chaos.finish(
        stack,
        valid,
        fault="network partition to the store (Postgres)",
        injected=f"every packet to and from a relay in front of Postgres dropped (iptables) for "
        f"{PARTITION:g} s, 1.5 s into a wave of ingest and flushes; the connections open across "
        "it dropped for good after (2 workers, 3 processes, beat)",
        times=1,
        events_in=len(events) + 1,
        extra={
            "seconds_partitioned": round(healed - went, 1),
            "seconds_until_consuming_again": consuming,
            "seconds_until_every_sent_event_recorded": caught_up,
            "connections_cut_for_good": len(hole.dropped_flows),
            "connections_through_relay": relay.connections,
            "link_settings": LINK,
        }
        | tally(stack.logs()),
    )
