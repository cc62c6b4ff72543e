"""The flush's bookkeeping at its edges, on a real (SQLite) store with VBA behind httpx's
MockTransport: every request's read-to-write window, the guard of a repair against a change
of our confirmed share, one definition per accumulator in a plans file."""

from __future__ import annotations

import json
import random
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import select, text, update

from models.buckets import COLUMNS
from models.sync import ZERO, LetterKind
from models.tables import FlushAttempt
from tests.unit.test_flush_protocol import PAIR, SimulatedVba, sqlite_store
from tests.unit.vba_fake import unit_settings, vba_json
from worker import db
from worker.flush.plans import PlanFileError, load_plans
from worker.flush.protocol import Flush
from worker.ingest.store import ingest
from worker.ops.reconcile import load_keys, repair
from worker.ops.replay import resolve
from worker.store.dead_letters import dead_letter
from worker.store.tables import T_ACCUM
from worker.vba import VbaClient

__all__ = ["sqlite_store"]  # the fixture, shared with the flush machine's module


def event(benefit: str, cents: int) -> dict[str, Any]:
    return {
        "event_id": f"e-{benefit}",
        "claim_id": f"c-{benefit}",
        "version": 1,
        "status": "adjudicated",
        "subscriber_id": PAIR[0],
        "group_id": PAIR[1],
        "plan_year": "2026",
        "plan_type": "MED",
        "benefit_code": benefit,
        "network": "in",
        "amounts": {"deductible": f"{cents / 100:.2f}"},
    }


class SlowSplitVba(SimulatedVba):
    """Lists in two pages, the second 30 ms slower; refuses the first batch call whole (a
    model-binding 400), so the flush splits it; each batch call takes 20 ms."""

    def __init__(self) -> None:
        super().__init__()
        self.refused = False

    def __call__(self, request: httpx.Request) -> httpx.Response:
        if request.method == "GET" and "accumulators" in request.url.path:
            return self._paged(request)
        if request.method == "PUT":
            time.sleep(0.02)
            if not self.refused:
                self.refused = True
                errors = {"$[0].benefit_Code": ["The value is not valid."]}
                body = {"title": "One or more validation errors occurred.", "errors": errors}
                return httpx.Response(400, json=body | {"traceId": "00-ab-cd-00"})
        return super().__call__(request)

    def _paged(self, request: httpx.Request) -> httpx.Response:
        page = int(request.url.params.get("page", "1"))
        if page == 2:
            time.sleep(0.03)
        rows = [self.wire(k) for k in sorted(self.rows)] if page == 1 else []
        info = {"TotalCount": len(rows), "TotalPages": 2, "CurrentPage": page, "PageSize": 100}
        return vba_json(rows, headers={"X-Pagination": json.dumps(info)})


def test_every_request_measures_its_read_to_write_window_from_the_first_page(
    sqlite_store: str,
) -> None:
    """The window a VBA write can fall into runs from the read's first page to each request:
    a read of two pages (the second 30 ms later) counts both, and a call VBA refuses whole is
    split in halves, each its own request with its own, later window (before, the window began
    after the last page, and every request of a chunk got its first request's figure)."""
    with db.session_scope() as s:
        ingest(s, [event("DED", 10_000), event("OOP", 5_000)])
        pair_id = s.execute(text("SELECT id FROM pair")).scalar_one()
    settings = unit_settings(vba_rate=1e6, vba_burst=10_000, vba_breaker_threshold=100)
    vba_rows = SlowSplitVba()
    for benefit in ("DED", "OOP"):  # VBA has the rows: the read's first page lists them
        vba_rows.rows[(*PAIR, "2026", "MED", benefit)] = dict(ZERO)
    with VbaClient(settings, transport=httpx.MockTransport(vba_rows)) as vba:
        report = Flush(pair_id, vba, settings, random.Random(0)).run()
    assert report.calls == 2  # the two halves, each answered 207
    query = select(FlushAttempt.read_to_put_ms).order_by(FlushAttempt.id)  # type: ignore[arg-type]
    with db.session_scope() as s:
        whole, first, second = s.execute(query).scalars().all()
    assert 30 <= whole < first < second, (whole, first, second)


def test_a_resolve_moves_the_confirmed_share_on_so_a_stale_repair_changes_nothing(
    sqlite_store: str,
) -> None:
    """Reconcile read a key, then an operator resolved its hold (our confirmed share changed):
    the repair computed from the old share must not be applied. Resolve (like every writer of
    ``pushed_*``) bumps ``pushed_seq``, the repair's guard (before, it did not: the stale
    repair went through, on a share that was no longer the key's)."""
    with db.session_scope() as s:
        ingest(s, [event("DED", 10_000)])
        (accum_id,) = s.execute(text("SELECT id FROM accumulator")).one()
        pair_id = s.execute(text("SELECT id FROM pair")).scalar_one()
        confirmed = {f"pushed_{c}": 0 for c in COLUMNS} | {"pushed_deductible_total": 10_000}
        s.execute(update(T_ACCUM).values(confirmed | {"held": True}))
        detail = {"vba_now": "20.00", "if_landed": {}, "if_not_landed": {}}
        payload = {"accumulator_id": accum_id, "deductible_Used": detail}
        kind = str(LetterKind.BELOW_SHARE)
        now = db.utcnow()
        dead_letter(s, "flush", payload, "held", now, accumulator_id=accum_id, kind=kind)
    with db.session_scope() as s:
        (state,) = load_keys(s, [pair_id])[pair_id][2]
        letter_id = s.execute(text("SELECT id FROM dead_letter")).scalar_one()
        resolve(s, letter_id, landed=False)
    with db.session_scope() as s:
        remote = dict.fromkeys(COLUMNS, 0)
        assert repair(s, state, remote, "exclusive") is False
        pushed = s.execute(text("SELECT pushed_deductible_total FROM accumulator")).scalar()
    assert pushed == 0  # as the resolve left it


def test_a_plans_file_defining_one_accumulator_twice_is_refused(tmp_path: Path) -> None:
    """Two records of one plan with one accum_Name (as VBA compares names) can't both be its
    definition: the file is refused, naming both records (before, the last one silently won,
    and a later push compared against the wrong content)."""
    path = tmp_path / "plans.json"
    records = [
        {"plan_ID": "PPO26", "accum_Name": "RXDED", "member_Deductible": 500},
        {"plan_ID": "PPO26", "accum_Name": "rxded ", "member_Deductible": 750},
    ]
    path.write_text(json.dumps(records))
    with pytest.raises(PlanFileError, match=r"record 1: accum_Name: .* \(record 0;"):
        load_plans(path)
