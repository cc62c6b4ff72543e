"""The VBA client against the sandbox over real loopback HTTP: every endpoint and every fault."""

from __future__ import annotations

import logging
import shutil
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import httpx
import pytest
from redis import Redis

from models.buckets import VBA_FIELDS
from models.vba import dumps
from worker.demo.sandboxes import SandboxHandle, running_sandbox
from worker.demo.sandboxes import vba_headers as sandbox_headers
from worker.sandbox.config import API_KEY, PASSWORD
from worker.vba import USER_AGENT, VbaAuthError, VbaClient, VbaRejected, VbaUnavailable

pytestmark = pytest.mark.integration

SUB, GROUP = "123456789", "GRP-A"
REDIS_DB = 11


def record(code: str = "DED", sub: str = SUB, **amounts: Any) -> dict[str, Any]:
    """A valid SubscriberAccum with every amount 0 unless given."""
    key = {"subscriber_ID": sub, "group_ID": GROUP, "plan_Year": "2026", "plan_Type": "MED"}
    return key | {"benefit_Code": code} | dict.fromkeys(VBA_FIELDS, Decimal(0)) | amounts


def redis_url() -> str:
    """Redis on loopback (started if down), on a database of this file's own, emptied."""
    url = f"redis://127.0.0.1:6379/{REDIS_DB}"
    try:
        Redis.from_url(url).ping()
    except Exception:
        if not shutil.which("redis-server"):
            pytest.skip("no Redis")
        args = ["redis-server", "--daemonize", "yes", "--bind", "127.0.0.1", "--port", "6379"]
        subprocess.run([*args, "--save", "", "--appendonly", "no"], check=True)
        time.sleep(0.5)
    Redis.from_url(url).flushdb()
    return url


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SandboxHandle]:
    """One sandbox subprocess for the module, its state in a SQLite file."""
    state = tmp_path_factory.mktemp("sandbox") / "state.db"
    # The client against the seeds' letter; the strict dialect has tests of its own
    # (test_vba_dialect.py, tests/unit/test_sandbox_dialect.py).
    with running_sandbox(state=state, seed=7, dialect="lax") as handle:
        yield handle


class Captured(logging.Handler):
    """Every accumsync log line as text."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        fields = getattr(record, "fields", {})
        self.lines.append(f"{record.getMessage()} {fields} {record.exc_text or ''}")


@pytest.fixture(autouse=True)
def fresh(sandbox: SandboxHandle) -> Iterator[Captured]:
    """Each test starts on an empty sandbox; its logs are checked for secrets afterwards."""
    sandbox.admin.reset()
    logger = logging.getLogger("accumsync")
    handler, level = Captured(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    yield handler
    logger.removeHandler(handler)
    logger.setLevel(level)
    assert_no_secrets(handler.lines, sandbox)


def assert_no_secrets(lines: list[str], sandbox: SandboxHandle) -> None:
    """No API key, password or token (any the sandbox ever issued) in the captured logs."""
    state = sandbox.flags["state"]
    with sqlite3.connect(state) as db:
        tokens = [t for (t,) in db.execute("SELECT token FROM tokens")]
    text = "\n".join(lines) + sandbox.log_path.read_text()
    for secret in [API_KEY, PASSWORD, *tokens]:
        assert secret not in text


@pytest.fixture
def client(sandbox: SandboxHandle) -> Iterator[VbaClient]:
    """A client for the sandbox, in-process token and bucket."""
    with VbaClient(sandbox.settings(vba_timeout=2.0)) as c:
        yield c


def raw(sandbox: SandboxHandle, method: str, path: str, **kwargs: Any) -> httpx.Response:
    """A hand-made call (headers exactly as given), for what our client never sends."""
    return httpx.request(method, sandbox.url + path, timeout=5, **kwargs)


def vba_headers(client: VbaClient) -> dict[str, str]:
    """Correct VBA headers with the client's current token, for hand-made calls."""
    return sandbox_headers(client.auth.token(), USER_AGENT)


# -- every endpoint -------------------------------------------------------------------------


def test_create_get_update_delete(client: VbaClient, sandbox: SandboxHandle) -> None:
    """Create, get, update and delete one row, with the amounts exact to the cent."""
    created = client.create_accumulator(
        record(copay_Amt=Decimal("12.30"), copay_Amt_Net=Decimal("12.30"))
    )
    assert created is not None and created.copay_Amt == Decimal("12.30")
    assert client.get_accumulator(SUB, GROUP, "2026", "MED", "DED").copay_Amt == Decimal("12.30")
    client.update_accumulator(record(copay_Amt=Decimal("0.05"), copay_Amt_OON=Decimal("0.05")))
    assert sandbox.admin.rows()[0]["copay_Amt"] == Decimal("0.05")
    client.delete_accumulator(SUB, GROUP, "2026", "MED", "DED")
    assert sandbox.admin.rows() == []
    assert sandbox.admin.counters()["by_route"]["accumulators.delete"] == {"204": 1}


def test_missing_row_is_404(client: VbaClient) -> None:
    """Get, update and delete of an absent row are VbaRejected(404)."""
    for call in (
        lambda: client.get_accumulator(SUB, GROUP, "2026", "MED", "NONE"),
        lambda: client.update_accumulator(record("NONE")),
        lambda: client.delete_accumulator(SUB, GROUP, "2026", "MED", "NONE"),
    ):
        with pytest.raises(VbaRejected) as caught:
            call()
        assert caught.value.status == 404 and caught.value.activity_id


def test_create_existing_is_rejected(client: VbaClient) -> None:
    """Creating a row that exists is refused (409); the batch is the upsert."""
    client.create_accumulator(record())
    with pytest.raises(VbaRejected) as caught:
        client.create_accumulator(record())
    assert caught.value.status == 409


def test_paging_250_records(client: VbaClient, sandbox: SandboxHandle) -> None:
    """250 rows come back as pages of 100, 100, 50 with X-Pagination, and all by iteration."""
    sandbox.admin.seed([record(f"B{i:03}") for i in range(250)] + [record("X", sub="OTHER")])
    first = client.list_accumulators(SUB, GROUP, page=1, page_size=100)
    assert (first.total_count, first.total_pages, len(first.items)) == (250, 3, 100)
    assert len(client.list_accumulators(SUB, GROUP, page=3, page_size=100).items) == 50
    codes = [r.benefit_Code for r in client.iter_accumulators(SUB, GROUP, page_size=100)]
    assert codes == [f"B{i:03}" for i in range(250)]
    assert sandbox.admin.counters()["by_route"]["accumulators.list"]["200"] == 5


def test_sort_by(client: VbaClient, sandbox: SandboxHandle) -> None:
    """sortBy orders by any field, several keys, asc or desc, names case-insensitive."""
    amounts = {"A": "3.00", "B": "1.00", "C": "3.00", "D": "2.00"}
    sandbox.admin.seed([record(c, allowed_Amt=Decimal(a)) for c, a in amounts.items()])
    desc = client.list_accumulators(SUB, GROUP, sort_by="benefit_Code:desc").items
    assert [r.benefit_Code for r in desc] == ["D", "C", "B", "A"]
    multi = client.list_accumulators(SUB, GROUP, sort_by="Allowed_Amt:desc,benefit_Code:asc")
    assert [r.benefit_Code for r in multi.items] == ["A", "C", "D", "B"]
    with pytest.raises(VbaRejected) as caught:
        client.list_accumulators(SUB, GROUP, sort_by="no_Such_Field")
    assert caught.value.status == 400


def test_batch_creates_then_updates(client: VbaClient, sandbox: SandboxHandle) -> None:
    """The batch upserts: 201 Created first, 200 Updated next, values exact."""
    first = client.upsert_accumulators(SUB, GROUP, [record("A"), record("B")])
    assert {i.status for i in first.items} == {201}
    second = client.upsert_accumulators(SUB, GROUP, [record("A", ded_PPO_Used=Decimal("9.99"))])
    item = second.find((SUB, GROUP, "2026", "MED", "A"))
    assert item is not None and (item.status, item.body) == (200, "Updated")
    assert second.activity_id
    row = next(r for r in sandbox.admin.rows() if r["benefit_Code"] == "A")
    assert row["ded_PPO_Used"] == Decimal("9.99")


def test_plan_batch(client: VbaClient, sandbox: SandboxHandle) -> None:
    """Plan accumulators upsert per (plan_ID, accum_Name) with a 207."""
    plan = {"plan_ID": "PLAN1", "accum_Name": "RXDED", "member_Deductible": Decimal("250.00")}
    result = client.upsert_plan_accumulators("PLAN1", [plan])
    assert result.find(("PLAN1", "RXDED")).status == 201  # type: ignore[union-attr]
    assert result.activity_id
    assert sandbox.admin.plans()[0]["member_Deductible"] == Decimal("250.00")


def test_sandbox_answers_invalid_items_per_item(client: VbaClient, sandbox: SandboxHandle) -> None:
    """An invalid item gets its own 400 with a message; the valid ones are written."""
    bad = record("BAD")
    del bad["copay_Amt"]
    path = f"/subscribers/{SUB}/groups/{GROUP}/accumulators-batch"
    body = [record("GOOD"), bad, record("ELSE", sub="987")]
    response = raw(sandbox, "PUT", path, headers=vba_headers(client), content=dumps(body))
    assert response.status_code == 207 and response.headers["content-type"].startswith("text/plain")
    statuses = [(i["id"][4]["value"], i["status"]) for i in response.json()["data"]]
    assert statuses == [("GOOD", 201), ("BAD", 400), ("ELSE", 400)]
    assert "copay_Amt" in response.json()["data"][1]["body"]
    assert [r["benefit_Code"] for r in sandbox.admin.rows()] == ["GOOD"]


def test_sandbox_validation_error_envelope(client: VbaClient, sandbox: SandboxHandle) -> None:
    """A create breaking a seed rule gets 400 with problem details in VBA's envelope."""
    path = f"/subscribers/{SUB}/groups/{GROUP}/accumulators"
    body = record() | {"plan_Type": "TOOLONG"}
    answer = raw(sandbox, "POST", path, headers=vba_headers(client), content=dumps(body)).json()
    assert answer["error"]["status"] == 400 and "plan_Type" in answer["error"]["detail"]
    assert answer["debug"]["activityId"] and answer["data"] is None


# -- faults ---------------------------------------------------------------------------------


@pytest.mark.parametrize("status", [500, 502, 503])
def test_5xx_raises_unavailable(client: VbaClient, sandbox: SandboxHandle, status: int) -> None:
    """An injected 5xx raises VbaUnavailable with that status and VBA's activityId."""
    client.auth.token()
    sandbox.admin.set_faults(**{f"error_{status}": 1.0})
    with pytest.raises(VbaUnavailable) as caught:
        client.upsert_accumulators(SUB, GROUP, [record()])
    assert caught.value.status == status and caught.value.activity_id


def test_429_storm_sets_retry_after(client: VbaClient, sandbox: SandboxHandle) -> None:
    """A 429 raises VbaUnavailable with retry_after from Retry-After seconds."""
    client.auth.token()
    sandbox.admin.set_faults(rate_429=1.0, retry_after=4)
    with pytest.raises(VbaUnavailable) as caught:
        client.list_accumulators(SUB, GROUP)
    assert (caught.value.status, caught.value.retry_after) == (429, 4.0)


def test_retry_after_as_http_date(client: VbaClient, sandbox: SandboxHandle) -> None:
    """A Retry-After given as an HTTP date becomes the seconds until then."""
    client.auth.token()
    sandbox.admin.set_faults(error_503=1.0, retry_after=30, retry_after_date=True)
    with pytest.raises(VbaUnavailable) as caught:
        client.list_accumulators(SUB, GROUP)
    assert caught.value.retry_after is not None and 25 <= caught.value.retry_after <= 31


def test_item_500s_are_reported_per_item(client: VbaClient, sandbox: SandboxHandle) -> None:
    """Item-level 500s come back on their own keys; only the 2xx items were written."""
    sandbox.admin.set_faults(item_error_rate=0.5)
    codes = [f"C{i:02}" for i in range(30)]
    result = client.upsert_accumulators(SUB, GROUP, [record(c) for c in codes])
    statuses = {c: result.find((SUB, GROUP, "2026", "MED", c)).status for c in codes}  # type: ignore[union-attr]
    assert set(statuses.values()) == {201, 500}
    written = {r["benefit_Code"] for r in sandbox.admin.rows()}
    assert written == {c for c, s in statuses.items() if s == 201}
    assert all(
        result.find((SUB, GROUP, "2026", "MED", c)).retryable for c in codes if c not in written
    )  # type: ignore[union-attr]


def test_shuffled_items_are_matched_by_key(client: VbaClient, sandbox: SandboxHandle) -> None:
    """With data[] shuffled, every item still finds its record by key."""
    sandbox.admin.seed([record(f"K{i:02}") for i in range(0, 20, 2)])
    sandbox.admin.set_faults(shuffle=True)
    codes = [f"K{i:02}" for i in range(20)]
    result = client.upsert_accumulators(SUB, GROUP, [record(c) for c in codes])
    order = [i.key["benefit_Code"] for i in result.items]
    assert order != codes and sorted(order) == codes
    for i, code in enumerate(codes):
        assert result.find((SUB, GROUP, "2026", "MED", code)).status == (200 if i % 2 == 0 else 201)  # type: ignore[union-attr]


def test_expired_token_is_refreshed_transparently(
    client: VbaClient, sandbox: SandboxHandle
) -> None:
    """Tokens expired by VBA: the call gets a 401, refreshes once and succeeds."""
    client.list_accumulators(SUB, GROUP)
    sandbox.admin.set_faults(expire_tokens=True)
    client.list_accumulators(SUB, GROUP)
    routes = sandbox.admin.counters()["by_route"]
    assert routes["accumulators.list"] == {"200": 2, "401": 1}
    assert routes["auth.refresh"] == {"200": 1} and routes["auth.login"] == {"200": 1}


def test_short_token_is_refreshed_before_expiry(client: VbaClient, sandbox: SandboxHandle) -> None:
    """A token near its end is refreshed before use, so VBA never answers 401."""
    sandbox.admin.set_faults(token_ttl=1.0)
    client.list_accumulators(SUB, GROUP)
    time.sleep(1.0)
    client.list_accumulators(SUB, GROUP)
    routes = sandbox.admin.counters()["by_route"]
    assert routes["accumulators.list"] == {"200": 2}
    assert routes["auth.refresh"] == {"200": 1}


def test_timeout_raises_unavailable(client: VbaClient, sandbox: SandboxHandle) -> None:
    """A call hanging past the client timeout raises VbaUnavailable."""
    client.auth.token()
    sandbox.admin.set_faults(timeout_rate=1.0, timeout_seconds=4)
    started = time.monotonic()
    with pytest.raises(VbaUnavailable) as caught:
        client.list_accumulators(SUB, GROUP)
    assert time.monotonic() - started < 3.5
    assert caught.value.status is None


def test_down_raises_unavailable(client: VbaClient, sandbox: SandboxHandle) -> None:
    """Down mode answers 503 to everything: VbaUnavailable."""
    sandbox.admin.set_faults(down=True)
    with pytest.raises(VbaUnavailable):
        client.list_accumulators(SUB, GROUP)


def test_outage_and_restart_keep_state(sandbox: SandboxHandle) -> None:
    """Sandbox stopped: VbaUnavailable; restarted: rows and token survive (no new login)."""
    with VbaClient(sandbox.settings(vba_timeout=2.0)) as client:
        client.upsert_accumulators(
            SUB, GROUP, [record(copay_Amt=Decimal("1.01"), copay_Amt_Net=Decimal("1.01"))]
        )
        sandbox.stop()
        try:
            with pytest.raises(VbaUnavailable):
                client.list_accumulators(SUB, GROUP)
        finally:
            sandbox.start()
        rows = client.list_accumulators(SUB, GROUP).items
    assert [r.amounts()["copay_Amt"] for r in rows] == [Decimal("1.01")]
    assert "auth.login" not in sandbox.admin.counters()["by_route"]


def test_sandbox_rate_limit_answers_429(client: VbaClient, sandbox: SandboxHandle) -> None:
    """Past VBA's burst the sandbox answers 429 with Retry-After."""
    headers = vba_headers(client)
    path = f"/subscribers/{SUB}/groups/{GROUP}/accumulators"
    with httpx.Client(base_url=sandbox.url, headers=headers) as http:
        answers = [http.get(path) for _ in range(70)]
    limited = [a for a in answers if a.status_code == 429]
    assert limited and all(int(a.headers["Retry-After"]) >= 1 for a in limited)
    assert sandbox.admin.counters()["by_status"]["429"] == len(limited)


# -- credentials and headers ----------------------------------------------------------------


def test_wrong_api_key_is_an_auth_error(sandbox: SandboxHandle) -> None:
    """A wrong x-api-key makes the login fail: VbaAuthError(403)."""
    with (
        VbaClient(sandbox.settings(vba_api_key="wrong-key")) as client,
        pytest.raises(VbaAuthError) as caught,
    ):
        client.list_accumulators(SUB, GROUP)
    assert caught.value.status == 403


def test_wrong_password_is_an_auth_error(sandbox: SandboxHandle) -> None:
    """Wrong Basic credentials: VbaAuthError(401)."""
    with (
        VbaClient(sandbox.settings(vba_password="wrong")) as client,
        pytest.raises(VbaAuthError) as caught,
    ):
        client.list_accumulators(SUB, GROUP)
    assert caught.value.status == 401


def test_wrong_database_is_an_auth_error(sandbox: SandboxHandle) -> None:
    """An unknown vbasoftware-database is refused at login."""
    with (
        VbaClient(sandbox.settings(vba_database="OTHERDB")) as client,
        pytest.raises(VbaAuthError) as caught,
    ):
        client.list_accumulators(SUB, GROUP)
    assert caught.value.status == 400


def test_missing_api_key_is_401(client: VbaClient, sandbox: SandboxHandle) -> None:
    """No x-api-key at all: 401 from the gateway."""
    headers = vba_headers(client)
    del headers["x-api-key"]
    assert (
        raw(
            sandbox, "GET", f"/subscribers/{SUB}/groups/{GROUP}/accumulators", headers=headers
        ).status_code
        == 401
    )


def test_missing_database_header_is_400(client: VbaClient, sandbox: SandboxHandle) -> None:
    """No vbasoftware-database header: 400 with problem details."""
    headers = vba_headers(client)
    del headers["vbasoftware-database"]
    answer = raw(sandbox, "GET", f"/subscribers/{SUB}/groups/{GROUP}/accumulators", headers=headers)
    assert answer.status_code == 400 and "vbasoftware-database" in answer.json()["error"]["detail"]


def test_no_user_agent_is_403(client: VbaClient, sandbox: SandboxHandle) -> None:
    """VBA answers 403 to a call without a User-Agent."""
    request = httpx.Request(
        "GET",
        f"{sandbox.url}/subscribers/{SUB}/groups/{GROUP}/accumulators",
        headers=vba_headers(client),
    )
    del request.headers["User-Agent"]
    with httpx.Client() as http:
        assert http.send(request).status_code == 403


def test_missing_bearer_is_401(sandbox: SandboxHandle, client: VbaClient) -> None:
    """A data call without a valid bearer token: 401 in VBA's envelope."""
    headers = vba_headers(client) | {"Authorization": "Bearer forged"}
    answer = raw(sandbox, "GET", f"/subscribers/{SUB}/groups/{GROUP}/accumulators", headers=headers)
    assert answer.status_code == 401 and answer.json()["error"]["title"] == "Unauthorized"


def test_redis_shares_one_token_between_clients(sandbox: SandboxHandle) -> None:
    """Two clients (as two processes would) sharing Redis log in once."""
    settings = sandbox.settings(redis_url=redis_url())
    with VbaClient(settings) as one, VbaClient(settings) as two:
        one.list_accumulators(SUB, GROUP)
        two.list_accumulators(SUB, GROUP)
        sandbox.admin.set_faults(expire_tokens=True)
        one.list_accumulators(SUB, GROUP)
        two.list_accumulators(SUB, GROUP)
    routes = sandbox.admin.counters()["by_route"]
    assert routes["auth.login"] == {"200": 1} and routes["auth.refresh"] == {"200": 1}
    assert routes["accumulators.list"] == {"200": 4, "401": 2}
