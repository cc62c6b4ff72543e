"""The sandbox's hostile faults over real loopback HTTP: lost answers, intrusions, the journal."""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal
from itertools import pairwise
from typing import Any

import httpx
import pytest

from models.buckets import VBA_FIELDS
from models.vba import dumps
from worker.demo.sandboxes import SandboxHandle, _flag, running_sandbox
from worker.demo.sandboxes import vba_headers as sandbox_headers
from worker.vba import USER_AGENT, VbaClient, VbaUnavailable

SUB, GROUP = "123456789", "GRP-A"
BATCH = f"/subscribers/{SUB}/groups/{GROUP}/accumulators-batch"
SAVE_FAILED = "An error occurred while saving the entity"


def record(code: str = "DED", sub: str = SUB, **amounts: Any) -> dict[str, Any]:
    """A valid SubscriberAccum with every amount 0 unless given."""
    return key(code, sub) | dict.fromkeys(VBA_FIELDS, Decimal(0)) | amounts


def key(code: str, sub: str = SUB) -> dict[str, str]:
    """The five key fields of one row."""
    return {"subscriber_ID": sub, "group_ID": GROUP, "plan_Year": "2026", "plan_Type": "MED"} | {
        "benefit_Code": code
    }


def ident(code: str) -> tuple[str, ...]:
    """The key as a BatchResult finds it."""
    return tuple(key(code).values())


def rows(sandbox: SandboxHandle) -> dict[str, dict[str, Any]]:
    """The pair's rows by benefit code, as the sandbox holds them now."""
    return {r["benefit_Code"]: r for r in sandbox.admin.rows() if r["subscriber_ID"] == SUB}


@pytest.fixture(scope="module")
def sandbox() -> Iterator[SandboxHandle]:
    """One sandbox subprocess for the module (reset and hang are about the connection)."""
    with running_sandbox(dialect="lax", seed=5) as handle:  # the faults, not the dialect
        yield handle


@pytest.fixture(autouse=True)
def fresh(sandbox: SandboxHandle) -> None:
    """Each test starts on an empty sandbox with the start-up faults."""
    sandbox.admin.reset()


@pytest.fixture
def client(sandbox: SandboxHandle) -> Iterator[VbaClient]:
    """The product's own client, logged in before the faults are set."""
    with VbaClient(sandbox.settings(vba_timeout=5.0)) as c:
        c.auth.token()
        yield c


# -- lost answers ---------------------------------------------------------------------------


def test_lost_answer_504_writes_and_answers_504(client: VbaClient, sandbox: SandboxHandle) -> None:
    """A lost answer (504 mode) writes the batch, answers 504 as the gateway in front of VBA
    would (no VBA envelope: the write may still land), and spends its countdown."""
    sandbox.admin.set_faults(lost_answers=1)
    with pytest.raises(VbaUnavailable) as caught:
        client.upsert_accumulators(SUB, GROUP, [record("A", copay_Amt=Decimal("4.20"))])
    assert caught.value.status == 504 and caught.value.activity_id is None
    assert caught.value.may_still_land
    assert rows(sandbox)["A"]["copay_Amt"] == Decimal("4.20")
    assert client.upsert_accumulators(SUB, GROUP, [record("A")]).items[0].status == 200
    assert sandbox.admin.set_faults()["lost_answers"] == 0
    assert sandbox.admin.counters()["by_route"]["accumulators.batch"] == {"207": 1, "504": 1}


def test_lost_answer_reset_writes_and_the_client_sees_a_transport_error(
    client: VbaClient, sandbox: SandboxHandle
) -> None:
    """A reset writes the batch, then cuts the answer short: a TransportError, never a 500."""
    sandbox.admin.set_faults(lost_answer="reset", lost_answer_rate=1.0)
    with pytest.raises(httpx.RemoteProtocolError):
        httpx.put(sandbox.url + BATCH, headers=vba_headers(client), content=dumps([record("A")]))
    with pytest.raises(VbaUnavailable) as caught:
        client.upsert_accumulators(SUB, GROUP, [record("B")])
    assert caught.value.status is None
    assert isinstance(caught.value.__cause__, httpx.TransportError)
    assert sorted(rows(sandbox)) == ["A", "B"]
    assert sandbox.admin.counters()["by_route"]["accumulators.batch"] == {"0": 2}


def test_lost_answer_hang_writes_and_the_client_times_out(sandbox: SandboxHandle) -> None:
    """A hang writes the batch, then answers only after timeout_seconds: the client times out."""
    sandbox.admin.set_faults(lost_answer="hang", lost_answers=1, timeout_seconds=3)
    started = time.monotonic()
    with (
        VbaClient(sandbox.settings(vba_timeout=0.5)) as impatient,
        pytest.raises(VbaUnavailable) as caught,
    ):
        impatient.upsert_accumulators(SUB, GROUP, [record("A", copay_Amt=Decimal("1.00"))])
    assert time.monotonic() - started < 2.5
    assert isinstance(caught.value.__cause__, httpx.TimeoutException)
    assert rows(sandbox)["A"]["copay_Amt"] == Decimal("1.00")
    assert sandbox.admin.counters()["by_route"]["accumulators.batch"] == {"504": 1}


def test_plan_batch_answers_can_be_lost(client: VbaClient, sandbox: SandboxHandle) -> None:
    """The plan batch loses answers too: written, answered 504, journaled as unanswered."""
    sandbox.admin.set_faults(lost_answer_rate=1.0)
    plan = {"plan_ID": "PLAN1", "accum_Name": "RXDED", "member_Deductible": Decimal("250.00")}
    with pytest.raises(VbaUnavailable) as caught:
        client.upsert_plan_accumulators("PLAN1", [plan])
    assert caught.value.status == 504
    assert sandbox.admin.plans()[0]["member_Deductible"] == Decimal("250.00")
    [write] = sandbox.admin.journal()
    assert (write["op"], write["key"], write["answered"]) == (
        "plans.batch",
        {"plan_ID": "PLAN1", "accum_Name": "RXDED"},
        False,
    )


# -- item 5xx after writing -----------------------------------------------------------------


def test_item_written_error_writes_and_reports_500(
    client: VbaClient, sandbox: SandboxHandle
) -> None:
    """An item-written error saves the row yet reports 500; the countdown covers N items."""
    sandbox.admin.set_faults(item_written_errors=1)
    result = client.upsert_accumulators(SUB, GROUP, [record("A"), record("B")])
    a, b = result.find(ident("A")), result.find(ident("B"))
    assert a is not None and (a.status, a.body, a.retryable) == (500, SAVE_FAILED, True)
    assert b is not None and b.status == 201
    assert sorted(rows(sandbox)) == ["A", "B"]
    sandbox.admin.set_faults(item_written_error_rate=1.0)
    again = client.upsert_accumulators(SUB, GROUP, [record("A", copay_Amt=Decimal("2.00"))])
    assert again.items[0].status == 500 and rows(sandbox)["A"]["copay_Amt"] == Decimal("2.00")
    journal = [(w["key"]["benefit_Code"], w["status"]) for w in sandbox.admin.journal()]
    assert journal == [("A", 500), ("B", 201), ("A", 500)]


# -- slow lists -----------------------------------------------------------------------------


def test_slow_list_delays_only_n_calls_and_reads_after_the_delay(
    client: VbaClient, sandbox: SandboxHandle
) -> None:
    """Only slow_lists lists wait, and each reads its rows when it answers (later writes show)."""
    sandbox.admin.set_faults(list_delay=0.8, slow_lists=1)
    with ThreadPoolExecutor(1) as pool, VbaClient(sandbox.settings()) as writer:
        started = time.monotonic()
        late = pool.submit(client.list_accumulators, SUB, GROUP)
        time.sleep(0.2)
        writer.upsert_accumulators(SUB, GROUP, [record("NEW")])
        assert not late.done()  # the write was served while the list waited
        page = late.result(timeout=5)
    assert time.monotonic() - started >= 0.8
    assert [r.benefit_Code for r in page.items] == ["NEW"]
    quick = time.monotonic()
    client.list_accumulators(SUB, GROUP)
    assert time.monotonic() - quick < 0.5
    assert sandbox.admin.set_faults()["slow_lists"] == 0


def test_list_delay_alone_delays_every_list(client: VbaClient, sandbox: SandboxHandle) -> None:
    """Without slow_lists, every list waits list_delay; other calls do not."""
    sandbox.admin.set_faults(list_delay=0.3)
    started = time.monotonic()
    client.list_accumulators(SUB, GROUP)
    client.list_accumulators(SUB, GROUP)
    client.upsert_accumulators(SUB, GROUP, [record("A")])
    assert 0.6 <= time.monotonic() - started < 1.5


# -- intrusions -----------------------------------------------------------------------------


def test_intrusion_after_list_adds_to_the_rows_it_returned(
    client: VbaClient, sandbox: SandboxHandle
) -> None:
    """After a list is answered VBA adds the deltas to every row it returned, as user VBA."""
    sandbox.admin.seed([record("A"), record("B"), record("C", sub="OTHER")])
    sandbox.admin.intrude("list", SUB, GROUP, {"ded_PPO_Used": Decimal("7.50")})
    page = client.list_accumulators(SUB, GROUP)
    assert [r.amounts()["ded_PPO_Used"] for r in page.items] == [0, 0]  # the answer came first
    now = rows(sandbox)
    assert [now[c]["ded_PPO_Used"] for c in "AB"] == [Decimal("7.50")] * 2
    assert now["A"]["update_User"] == "VBA"
    assert (
        next(r for r in sandbox.admin.rows() if r["subscriber_ID"] == "OTHER")["ded_PPO_Used"] == 0
    )
    assert sandbox.admin.intrusions() == []


def test_intrusion_skips_then_fires_times(client: VbaClient, sandbox: SandboxHandle) -> None:
    """``skip`` matching calls pass, the next ``times`` set it off, then it is gone."""
    sandbox.admin.seed([record("A")])
    sandbox.admin.intrude("list", SUB, GROUP, {"copay_Amt": Decimal(1)}, skip=1, times=2)
    seen: list[Any] = []
    for _ in range(4):
        seen.append(client.list_accumulators(SUB, GROUP).items[0].amounts()["copay_Amt"])
        left = sandbox.admin.intrusions()
        seen.append((left[0]["skip"], left[0]["times"]) if left else None)
    assert seen == [0, (0, 2), 0, (0, 1), 1, None, 2, None]
    assert rows(sandbox)["A"]["copay_Amt"] == Decimal(2)


def test_intrusion_waits_for_its_own_pair_and_kind(
    client: VbaClient, sandbox: SandboxHandle
) -> None:
    """A batch intrusion ignores lists of its pair and batches of other pairs."""
    sandbox.admin.intrude("batch", SUB, GROUP, {"copay_Amt": Decimal(1)})
    client.upsert_accumulators("OTHER", GROUP, [record("A", sub="OTHER")])
    client.list_accumulators(SUB, GROUP)
    assert [i["times"] for i in sandbox.admin.intrusions()] == [1]
    assert [w["op"] for w in sandbox.admin.journal()] == ["accumulators.batch"]


def test_intrusion_with_keys_creates_a_missing_row_at_zero(
    client: VbaClient, sandbox: SandboxHandle
) -> None:
    """Explicit keys: only those rows change; a missing one is created at zero plus deltas."""
    new = {"plan_Year": "2026", "plan_Type": "MED", "benefit_Code": "NEW"}
    sandbox.admin.intrude("batch", SUB, GROUP, {"ded_PPO_Used": Decimal("3.25")}, keys=[new])
    client.upsert_accumulators(SUB, GROUP, [record("A", ded_PPO_Used=Decimal("10.00"))])
    now = rows(sandbox)
    assert now["A"]["ded_PPO_Used"] == Decimal("10.00")
    created = {f: now["NEW"][f] for f in VBA_FIELDS}
    assert created == dict.fromkeys(VBA_FIELDS, 0) | {"ded_PPO_Used": Decimal("3.25")}
    assert (now["NEW"]["entry_User"], now["NEW"]["update_User"]) == ("VBA", "VBA")


def test_intrusion_after_batch_touches_only_rows_it_wrote(
    client: VbaClient, sandbox: SandboxHandle
) -> None:
    """Default keys of a batch are the rows it wrote (written 500s too), not refused items."""
    sandbox.admin.set_faults(item_written_errors=1)
    sandbox.admin.intrude("batch", SUB, GROUP, {"copay_Amt": Decimal("0.50")})
    body = [record("A"), record("B"), record("BAD") | {"copay_Amt": None}]
    answer = httpx.put(sandbox.url + BATCH, headers=vba_headers(client), content=dumps(body))
    assert [i["status"] for i in answer.json()["data"]] == [500, 201, 400]
    now = rows(sandbox)
    assert sorted(now) == ["A", "B"]
    assert [now[c]["copay_Amt"] for c in "AB"] == [Decimal("0.50")] * 2


def test_intrusion_then_lost_answer_leaves_target_plus_deltas(
    client: VbaClient, sandbox: SandboxHandle
) -> None:
    """Order is write, intrusion, lost answer: a later read sees our target plus VBA's deltas."""
    sandbox.admin.set_faults(lost_answers=1)
    sandbox.admin.intrude("batch", SUB, GROUP, {"ded_PPO_Used": Decimal("5.00")})
    with pytest.raises(VbaUnavailable):
        client.upsert_accumulators(SUB, GROUP, [record("A", ded_PPO_Used=Decimal("10.00"))])
    assert client.get_accumulator(*ident("A")).amounts()["ded_PPO_Used"] == Decimal("15.00")
    writes = [(w["op"], w["user"], w["answered"]) for w in sandbox.admin.journal()]
    assert writes == [("accumulators.batch", "sandbox", False), ("intrusion", "VBA", True)]


BAD_INTRUSIONS = [
    ({"after": "sometime"}, "after"),
    ({"deltas": {"no_Such_Amt": 1}}, "no_Such_Amt"),
    ({"deltas": {"copay_Amt": "1.001"}}, "deltas.copay_Amt"),
    ({"subscriber_ID": None}, "subscriber_ID"),
    ({"group_ID": None}, "group_ID"),
    ({"keys": [{"plan_Year": "2026", "plan_Type": "TOOLONG", "benefit_Code": "A"}]}, "plan_Type"),
    ({"times": 0}, "times"),
    ({"when": "now"}, "when"),
]


@pytest.mark.parametrize(("change", "field"), BAD_INTRUSIONS)
def test_bad_intrusion_is_400_naming_the_field(
    sandbox: SandboxHandle, change: dict[str, Any], field: str
) -> None:
    """A bad intrude body gets a 400 whose message names the field; nothing is queued."""
    body = {"after": "list", "subscriber_ID": SUB, "group_ID": GROUP, "deltas": {"copay_Amt": 1}}
    body = {k: v for k, v in (body | change).items() if v is not None}
    answer = sandbox.admin.http.post("/intrude", content=dumps(body))
    assert answer.status_code == 400 and field in answer.json()["error"]
    assert sandbox.admin.intrusions() == []


# -- the journal ----------------------------------------------------------------------------


def test_journal_records_every_write_in_order(client: VbaClient, sandbox: SandboxHandle) -> None:
    """Every write, in order, with user, status, before/after; answered false when lost."""
    sandbox.admin.seed([record("S")])
    client.create_accumulator(record("C"))
    client.update_accumulator(record("C", copay_Amt=Decimal("2.00")))
    client.upsert_accumulators(SUB, GROUP, [record("C", copay_Amt=Decimal("3.00")), record("B")])
    client.delete_accumulator(*ident("B"))
    sandbox.admin.adjust(key("S"), {"copay_Amt": Decimal("1.00")})
    sandbox.admin.set_faults(lost_answers=1)
    with pytest.raises(VbaUnavailable):
        client.upsert_accumulators(SUB, GROUP, [record("C", copay_Amt=Decimal("4.00"))])
    writes = sandbox.admin.journal()
    assert [summary(w) for w in writes] == [
        ("admin.seed", "S", "VBA", 200, True, None, 0),
        ("accumulators.create", "C", "sandbox", 200, True, None, 0),
        ("accumulators.update", "C", "sandbox", 200, True, 0, 2),
        ("accumulators.batch", "C", "sandbox", 200, True, 2, 3),
        ("accumulators.batch", "B", "sandbox", 201, True, None, 0),
        ("accumulators.delete", "B", "sandbox", 204, True, 0, None),
        ("admin.adjust", "S", "VBA", 200, True, 0, 1),
        ("accumulators.batch", "C", "sandbox", 200, False, 3, 4),
    ]
    seqs = [w["seq"] for w in writes]
    assert seqs == list(range(seqs[0], seqs[0] + 8))
    assert sandbox.admin.journal(since=seqs[4]) == writes[5:]
    assert all(a["at"] <= b["at"] for a, b in pairwise(writes))
    assert writes[0]["key"] == key("S")


def summary(write: dict[str, Any]) -> tuple[Any, ...]:
    """(op, benefit code, user, status, answered, copay before, copay after)."""
    before, after = (r["copay_Amt"] if r else None for r in (write["before"], write["after"]))
    code = write["key"]["benefit_Code"]
    return (write["op"], code, write["user"], write["status"], write["answered"], before, after)


def test_reset_clears_the_journal_and_its_seq_goes_on(sandbox: SandboxHandle) -> None:
    """A reset forgets the writes; seq numbers are never reused, so ``since`` stays safe."""
    sandbox.admin.seed([record("A")])
    [first] = sandbox.admin.journal()
    sandbox.admin.reset()
    assert sandbox.admin.journal() == []
    sandbox.admin.seed([record("A")])
    assert [w["seq"] for w in sandbox.admin.journal()] == [first["seq"] + 1]


# -- flags ----------------------------------------------------------------------------------


def test_new_faults_are_flags_too() -> None:
    """Every new fault can be set at start by ``accumsync sandbox`` flags, as tests pass them."""
    assert _flag("lost_answer", "reset") == ["--lost-answer", "reset"]
    assert _flag("slow_lists", None) == []
    flags = {"lost_answer": "reset", "lost_answers": 2, "lost_answer_rate": 0.25}
    flags |= {"item_written_errors": 3, "item_written_error_rate": 0.5}
    flags |= {"list_delay": 0.25, "slow_lists": 4}
    with running_sandbox(**flags) as handle:
        faults = handle.admin.set_faults()
        refused = handle.admin.http.post("/faults", content=dumps({"lost_answer": "drop"}))
    assert {name: faults[name] for name in flags} == flags
    assert refused.status_code == 400 and "lost_answer" in refused.json()["error"]


def test_batches_overlapping_on_one_pair_are_counted(
    client: VbaClient, sandbox: SandboxHandle
) -> None:
    """Two batch calls for one pair at once count one overlap (a flush's fence says never);
    calls for two pairs at once, or one after the other, count none."""
    sandbox.admin.set_faults(latency=0.5)
    # Pairs of its own: an earlier test's hung call on BATCH may still be in the sandbox's hands.
    one, two = (f"/subscribers/{s}/groups/{GROUP}/accumulators-batch" for s in ("5551", "5552"))
    body = {"headers": vba_headers(client), "content": dumps([record("A", sub="5551")])}

    def put(path: str) -> int:
        return httpx.put(sandbox.url + path, timeout=10, **body).status_code

    with ThreadPoolExecutor(2) as pool:
        assert list(pool.map(put, [one, two])) == [207, 207]
        assert put(one) == 207
        assert sandbox.admin.counters()["overlapping_batches"] == 0
        assert list(pool.map(put, [one, one])) == [207, 207]
    assert sandbox.admin.counters()["overlapping_batches"] == 1


def vba_headers(client: VbaClient) -> dict[str, str]:
    """Correct VBA headers with the client's current token, for hand-made calls."""
    return sandbox_headers(client.auth.token(), USER_AGENT)
