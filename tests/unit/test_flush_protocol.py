"""The flush protocol as a state machine: the real ``Flush`` on a real (SQLite) store, against a
simulated VBA behind httpx's MockTransport, under any interleaving hypothesis finds.

Two flushes of one pair are driven step by step (lease, read, send, settle), and between any two
steps: claims are ingested, VBA writes amounts of its own, resets a row or one field of it, the
next PUT lands with its answer lost (or not at all), a gateway answers it 502 or 504 at once
while VBA writes it later (or never), VBA's own 502 follows a write, an item is answered 500
after (or without) being written, a list is answered 404 by a gateway, leases lapse, the settle
grace passes (a late write not landed by then never lands), a flush dies after its PUT, an
operator resolves a hold from the truth. Throughout and at the end:

- every held key is an open dead letter carrying both candidate readings of each field in
  question (ambiguous, or below our share); the operator picks the true one;
- no amount VBA ever held was negative;
- at the end, every lease lapsed, every grace passed, VBA healthy and the holds resolved, the
  flushes drain, and every key's VBA row == VBA's own share + our ledger total, to the cent.

VBA's own writes never land between a flush's read and its PUT's landing: there the protocol can
only keep the window small (docs/design.md, "The limits"), and a write there is overwritten by
design. A PUT a gateway gave up on lands when VBA finishes it, so its window lasts until then.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Iterator
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import httpx
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)
from sqlalchemy import select, text, update

from models.buckets import COLUMN_TO_VBA
from models.sync import HOLDS, ZERO, Cents
from models.tables import DeadLetter
from models.vba import dumps, loads
from tests.unit.vba_fake import problem, unit_settings, vba_json
from worker import db
from worker.flush.protocol import Flush
from worker.ingest.store import ingest
from worker.ops.replay import resolve
from worker.settings import get_settings
from worker.store.tables import KEY_COLS, T_ACCUM, T_DEAD, T_PAIR
from worker.vba import VbaClient

PAIR = ("S1", "G1")
BENEFITS = ("DED", "OOP")
KEYS = [(*PAIR, "2026", "MED", b) for b in BENEFITS]
OURS = ("deductible_total", "deductible_in", "coinsurance_total", "coinsurance_in")
OUR_FIELDS = {"deductible": OURS[:2], "coinsurance": OURS[2:]}  # our claims' two trios
OWN = ("copay_total", "copay_in")  # VBA's own claims: in-network copay (never a coincidence)
TABLES = (
    "received_event",
    "claim",
    "accumulator",
    "pair",
    "dead_letter",
    "ingest_batch",
    "flush_attempt",
)


class SimulatedVba:
    """VBA's accumulator rows, its own writes, and the next PUT's fate; a MockTransport handler."""

    def __init__(self) -> None:
        self.rows: dict[tuple[str, ...], Cents] = {}
        self.next_put = "ok"
        self.next_list = "ok"
        self.applied: dict[tuple[str, ...], Cents] = {}  # the last target of ours written
        self.late: list[tuple[tuple[str, ...], Cents]] = []  # writes VBA is still working on
        self.negative = False

    def write(self, key: tuple[str, ...], cents: Cents) -> None:
        self.negative |= min(cents.values()) < 0
        self.rows[key] = cents
        self.applied[key] = dict(cents)  # what we wrote, not what VBA adds later

    def __call__(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path
        if path.endswith("/user-authentication"):
            result = {"idToken": "tok", "refreshToken": "ref", "expiresIn": 86400}
            return vba_json({"authenticationResult": result})
        if request.method == "GET":
            return self._list(request)
        return self._batch(request)

    def _list(self, request: httpx.Request) -> httpx.Response:
        fate, self.next_list = self.next_list, "ok"
        if fate == "gateway_404":  # a route or a gateway: says nothing of VBA's rows
            return httpx.Response(404, json={"message": "Not Found"})
        if not self.rows:  # VBA's own "not found": the subscriber has no row at all
            return problem(404, "Not Found", "Subscriber not found")
        page = int(parse_qs(request.url.query.decode()).get("page", ["1"])[0])
        rows = [self.wire(k) for k in sorted(self.rows)] if page == 1 else []
        info = {"TotalCount": len(rows), "TotalPages": 1, "CurrentPage": page, "PageSize": 100}
        return vba_json(rows, headers={"X-Pagination": json.dumps(info)})

    def wire(self, key: tuple[str, ...]) -> dict[str, Any]:
        names = ("subscriber_ID", "group_ID", "plan_Year", "plan_Type", "benefit_Code")
        amounts = {COLUMN_TO_VBA[c]: Decimal(v).scaleb(-2) for c, v in self.rows[key].items()}
        return dict(zip(names, key, strict=True)) | amounts

    def _batch(self, request: httpx.Request) -> httpx.Response:
        fate, self.next_put = self.next_put, "ok"
        items = []
        for record in loads(request.content):
            key = tuple(
                str(record[f])
                for f in ("subscriber_ID", "group_ID", "plan_Year", "plan_Type", "benefit_Code")
            )
            cents = {c: int(Decimal(str(record[v])) * 100) for c, v in COLUMN_TO_VBA.items()}
            if fate in ("late_502", "late_504"):
                self.late.append((key, cents))
            elif fate not in ("lost_not_landed", "item_500", "late_never"):
                self.write(key, cents)
            status = 500 if fate in ("item_500", "item_500_written") else 200
            ident = [
                {"key": f, "value": record[f]}
                for f in ("subscriber_ID", "group_ID", "plan_Year", "plan_Type", "benefit_Code")
            ]
            items.append({"id": ident, "status": status, "body": "Updated"})
        if fate.startswith("lost"):
            raise httpx.ReadTimeout("the answer was lost", request=request)
        if fate.startswith("late"):  # a gateway's answer, at once: VBA goes on (or drops it)
            return httpx.Response(504 if fate == "late_504" else 502, json={"message": "gone"})
        if fate == "vba_502_written":  # VBA's own handler failed after writing: it is done
            return problem(502, "Bad Gateway", "VBA failed after saving")
        if fate == "missing_item":
            items = items[1:]
        return httpx.Response(207, content=dumps({"data": items, "debug": {"activityId": "a"}}))


class FlushMachine(RuleBasedStateMachine):
    """See the module docstring."""

    def __init__(self) -> None:
        super().__init__()
        self.vba = SimulatedVba()
        self.own: dict[tuple[str, ...], int] = dict.fromkeys(KEYS, 0)  # VBA's own copay
        self.holders: dict[str, Iterator[str] | None] = {"A": None, "B": None}
        self.phase: dict[str, str] = {"A": "idle", "B": "idle"}
        self.claims = 0
        with db.engine().begin() as conn:
            for table in TABLES:
                conn.execute(text(f"DELETE FROM {table}"))
        self.settings = unit_settings()
        self.vba_client = VbaClient(self.settings, transport=httpx.MockTransport(self.vba))

    @initialize(batch_max=st.sampled_from([1, 2]))
    def setup(self, batch_max: int) -> None:
        """One or two keys per batch call (chunks of one: a read before each PUT)."""
        self.vba_client.close()
        self.settings = unit_settings(
            vba_batch_max=batch_max, vba_rate=1e6, vba_burst=10_000, vba_breaker_threshold=10_000
        )
        self.vba_client = VbaClient(self.settings, transport=httpx.MockTransport(self.vba))

    # -- the world -------------------------------------------------------------------------

    @rule(
        benefit=st.sampled_from(BENEFITS),
        cents=st.integers(1, 50_000),
        coins=st.integers(0, 9_999),
    )
    def ingest_claim(self, benefit: str, cents: int, coins: int = 0) -> None:
        """A new claim of ours adds to a key (a deductible, and a coinsurance)."""
        self.claims += 1
        self._ingest(self._event(f"c{self.claims}", 0, benefit, cents, coins))

    @precondition(lambda self: self.claims > 0)
    @rule(data=st.data())
    def reverse_claim(self, data: st.DataObject) -> None:
        """A later version voids one of our claims."""
        n = data.draw(st.integers(1, self.claims))
        self._ingest(self._event(f"c{n}", 9, "DED", 0, status="reversed"))

    def _event(
        self, claim: str, version: int, benefit: str, cents: int, coins: int = 0, **extra: Any
    ) -> dict[str, Any]:
        amounts = {"deductible": str(Decimal(cents).scaleb(-2))}
        amounts["coinsurance"] = str(Decimal(coins).scaleb(-2))
        return {
            "event_id": f"{claim}-v{version}",
            "claim_id": claim,
            "version": version,
            "status": "adjudicated",
            "subscriber_id": PAIR[0],
            "group_id": PAIR[1],
            "plan_year": "2026",
            "plan_type": "MED",
            "benefit_code": benefit,
            "network": "in",
            "amounts": amounts,
        } | extra

    def _ingest(self, event: dict[str, Any]) -> None:
        with db.session_scope() as s:
            ingest(s, [event])

    def _no_window_open(self) -> bool:
        """No flush between its read and its PUT, and no PUT of ours still on its way into
        VBA's rows (a gateway answered 502 or 504 and VBA goes on): a write of ours lands with
        the values it read, so a write of VBA's own before it lands is overwritten whatever
        the protocol does (docs/design.md, "The limits")."""
        return "read" not in self.phase.values() and not self.vba.late

    @precondition(_no_window_open)
    @rule(key=st.sampled_from(KEYS), cents=st.integers(1, 9_999))
    def vba_adds_its_own(self, key: tuple[str, ...], cents: int) -> None:
        """VBA adjudicates a claim of its own on the row (a copay)."""
        row = self.vba.rows.setdefault(key, dict(ZERO))
        for c in OWN:
            row[c] += cents
        self.own[key] += cents

    @precondition(_no_window_open)
    @rule(key=st.sampled_from(KEYS))
    def vba_resets_a_row(self, key: tuple[str, ...]) -> None:
        """VBA rebuilds the row from nothing: its own share and ours are gone."""
        if key in self.vba.rows:
            self.vba.rows[key] = dict(ZERO)
            self.own[key] = 0
            self.vba.applied.pop(key, None)

    @precondition(_no_window_open)
    @rule(key=st.sampled_from(KEYS), fields=st.sampled_from(sorted(OUR_FIELDS)))
    def vba_resets_a_field(self, key: tuple[str, ...], fields: str) -> None:
        """A hand edit in VBA sets one trio of the row to zero (ours was there): one field of
        the row is below our share, the other 29 are as they were. Our last write to the row
        still landed (``applied`` stays): an operator asked about it answers "landed"."""
        if key in self.vba.rows:
            for c in OUR_FIELDS[fields]:
                self.vba.rows[key][c] = 0

    @rule(
        fate=st.sampled_from(
            [
                "lost_landed",
                "lost_not_landed",
                "item_500",
                "item_500_written",
                "missing_item",
                "late_502",
                "late_504",
                "late_never",
                "vba_502_written",
            ]
        )
    )
    def next_put_fails(self, fate: str) -> None:
        self.vba.next_put = fate

    @rule()
    def next_list_is_a_gateway_404(self) -> None:
        self.vba.next_list = "gateway_404"

    @precondition(lambda self: bool(self.vba.late))
    @rule()
    def a_late_write_lands(self) -> None:
        """VBA finishes a call a gateway gave up on: its write lands now, inside the grace."""
        key, cents = self.vba.late.pop(0)
        self.vba.write(key, cents)

    @rule()
    def the_grace_passes(self) -> None:
        """Past the settle grace: a late write that has not landed never will, and every write
        of unknown outcome may be settled."""
        self._grace_passes()

    def _grace_passes(self) -> None:
        self.vba.late.clear()
        with db.engine().begin() as conn:
            a = T_ACCUM.c
            long_ago = datetime(2000, 1, 1, tzinfo=UTC)
            conn.execute(update(T_ACCUM).where(a.intent_at.is_not(None)).values(intent_at=long_ago))

    @rule()
    def leases_lapse(self) -> None:
        """Time passes beyond every lease (and every backoff)."""
        self._time_passes()

    def _time_passes(self) -> None:
        with db.engine().begin() as conn:
            conn.execute(
                update(T_PAIR).values(lease_until=None, next_attempt_at=None, queued_until=None)
            )
            conn.execute(update(T_ACCUM).values(next_attempt_at=None))

    # -- two flushes of the pair -----------------------------------------------------------

    @rule(who=st.sampled_from(["A", "B"]), until=st.sampled_from(["leased", "read", "sent", "end"]))
    def flush_advances(self, who: str, until: str) -> None:
        """Start a flush of the pair, or go on with it, up to a step (lease, read, send) or to
        its end; another flush or the world may move in between."""
        if self.holders[who] is None:
            flush = Flush(self._pair_id(), self.vba_client, self.settings, random.Random(0))
            self.holders[who] = flush.steps()
        steps = self.holders[who]
        assert steps is not None
        for phase in steps:
            self.phase[who] = phase
            if phase == until:
                return
        self.holders[who], self.phase[who] = None, "idle"

    @precondition(lambda self: any(h is not None for h in self.holders.values()))
    @rule(who=st.sampled_from(["A", "B"]))
    def flush_dies(self, who: str) -> None:
        """SIGKILL: the flush stops wherever it is; nothing cleans up (its lease lapses)."""
        self.holders[who], self.phase[who] = None, "idle"

    @rule(data=st.data())
    def operator_resolves_a_hold(self, data: st.DataObject) -> None:
        """An operator checks VBA's claims (here: the simulation's truth) and settles a hold."""
        holds = self._holds()
        if holds:
            self._resolve(data.draw(st.sampled_from(holds)))

    def _holds(self) -> list[int]:
        """The open holds' ids."""
        d = T_DEAD.c
        open_holds = d.kind.in_(sorted(HOLDS)), d.replayed_at.is_(None)
        query = select(d.id).where(*open_holds).order_by(d.id)
        with db.engine().connect() as conn:
            return list(conn.execute(query).scalars())

    def _resolve(self, letter_id: int) -> None:
        """Resolve as the truth says: an ambiguous write landed when VBA holds what the intent
        recorded; a row below our share holds none of ours in the fields named."""
        with db.session_scope() as s:
            letter = s.get(DeadLetter, letter_id)
            assert letter is not None
            row = s.execute(select(T_ACCUM).where(T_ACCUM.c.id == letter.accumulator_id))
            found = row.mappings().one()
            key = tuple(found[c] for c in KEY_COLS)
            landed = letter.kind == "ambiguous" and self._landed(key, found["intent_target"])
            resolve(s, letter_id, landed)

    def _landed(self, key: tuple[str, ...], intent_target: str | None) -> bool:
        return intent_target is not None and self.vba.applied.get(key) == json.loads(intent_target)

    def _pair_id(self) -> int:
        with db.engine().connect() as conn:
            found = conn.execute(select(T_PAIR.c.id)).scalar()
        return int(found) if found is not None else 0

    # -- what must hold -------------------------------------------------------------------

    @invariant()
    def never_negative(self) -> None:
        assert not self.vba.negative, "a negative amount reached VBA"

    @invariant()
    def holds_carry_both_candidates(self) -> None:
        """Each hold names the fields in question, each with what either answer means."""
        d = T_DEAD.c
        open_holds = d.kind.in_(sorted(HOLDS)), d.replayed_at.is_(None)
        with db.engine().connect() as conn:
            payloads = conn.execute(select(d.kind, d.payload).where(*open_holds)).all()
        for kind, payload in payloads:
            body = json.loads(payload)
            named = body["candidates"] if kind == "ambiguous" else body
            fields = {f: v for f, v in named.items() if isinstance(v, dict)}
            assert fields, body
            for field in fields.values():
                assert {"if_landed", "if_not_landed"} <= set(field), body

    def teardown(self) -> None:
        """Every flush gone, leases and backoffs lapsed, VBA healthy, one more claim on every
        key (so a flush reads each row again); the flushes drain while an operator resolves
        each hold from the truth. Then VBA holds its own share plus ours on every key."""
        self.vba.next_put = self.vba.next_list = "ok"
        self.holders = {"A": None, "B": None}
        for benefit in BENEFITS:
            self.ingest_claim(benefit, 1)
        for _ in range(8):
            self._time_passes()
            self._grace_passes()
            for hold in self._holds():
                self._resolve(hold)
            Flush(self._pair_id(), self.vba_client, self.settings, random.Random(0)).run()
        assert self._holds() == []
        with db.engine().connect() as conn:
            rows = conn.execute(select(T_ACCUM)).mappings().all()
        for row in rows:
            key = tuple(row[c] for c in KEY_COLS)
            remote = self.vba.rows.get(key, dict(ZERO))
            assert row["dirty_since"] is None and row["intent_target"] is None, row
            assert [remote[c] for c in OWN] == [self.own[key]] * 2
            assert [remote[c] for c in OURS] == [row[c] for c in OURS]
        self.vba_client.close()


@pytest.fixture
def sqlite_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A migrated SQLite store that ``worker.db`` and the settings point at."""
    url = f"sqlite:///{tmp_path / 'store.db'}"
    db.upgrade(url)
    monkeypatch.setenv("ACCUMSYNC_DATABASE_URL", url)
    monkeypatch.setenv("ACCUMSYNC_HOME", str(tmp_path))
    # The machine decides when the grace has passed (the_grace_passes): never on its own.
    monkeypatch.setenv("ACCUMSYNC_SETTLE_GRACE", "3600")
    monkeypatch.setenv("ACCUMSYNC_VBA_TIMEOUT", "1")
    monkeypatch.setenv("ACCUMSYNC_MAX_ATTEMPTS", "1000")
    monkeypatch.setenv("ACCUMSYNC_OWNERSHIP", "shared")
    get_settings.cache_clear()
    db.reset_engine()
    yield url
    db.reset_engine()
    get_settings.cache_clear()


def test_flush_protocol_under_any_interleaving(sqlite_store: str) -> None:
    """Races, lost answers, VBA's own writes, lapsed leases, crashes: never a share twice."""
    run_state_machine_as_test(
        FlushMachine,
        settings=settings(
            max_examples=int(os.environ.get("ACCUMSYNC_MACHINE_EXAMPLES", "150")),
            stateful_step_count=40,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow],
        ),
    )
