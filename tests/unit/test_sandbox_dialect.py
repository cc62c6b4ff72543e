"""The sandbox's strict dialect (and that lax is unchanged), driven by raw HTTP over loopback."""

from __future__ import annotations

import base64
import re
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest

from models.buckets import VBA_FIELDS
from models.vba import PLAN_LIMIT_FIELDS, PlanAccumulator, Record, SubscriberAccum, loads
from worker.demo.sandboxes import SandboxHandle, running_sandbox
from worker.sandbox import config as c
from worker.sandbox.binding import NOT_NULL
from worker.sandbox.dialect import dumps

SUB, GROUP = "abc123", "Grp-A"
PLAN = "PLAN-1"
TRACE_ID = re.compile(r"^00-[0-9a-f]{32}-[0-9a-f]{16}-00$")
NEGATIVE = "deductible_Used: must not be negative"


def record(code: str = "DED", sub: str = SUB, group: str = GROUP, **fields: Any) -> dict[str, Any]:
    """A valid SubscriberAccum with every amount 0 unless given."""
    key = {"subscriber_ID": sub, "group_ID": group, "plan_Year": "2026", "plan_Type": "MED"}
    return key | {"benefit_Code": code} | dict.fromkeys(VBA_FIELDS, Decimal(0)) | fields


def plan(name: str = "ACC", **fields: Any) -> dict[str, Any]:
    """A valid PlanAccumulator (an Added Accumulator) of PLAN."""
    return {"plan_ID": PLAN, "accum_Name": name} | fields


class Vba:
    """Raw HTTP to one sandbox with VBA's gateway headers and a fresh id token."""

    def __init__(self, url: str) -> None:
        headers = {"x-api-key": c.API_KEY, "vbasoftware-database": c.DATABASE}
        self.http = httpx.Client(base_url=url, headers=headers | {"user-agent": "tests/1"})
        basic = base64.b64encode(f"{c.USERNAME}:{c.PASSWORD}".encode()).decode()
        login = {"authorization": f"Basic {basic}", "vbasoftware-client-id": c.CLIENT_ID}
        login["vbasoftware-client-code"] = c.CLIENT_CODE
        answer = self.http.post("/user-authentication", headers=login)
        token = answer.json()["data"]["authenticationResult"]["idToken"]
        self.http.headers["authorization"] = f"Bearer {token}"

    def batch(
        self, items: list[Any] | str, sub: str = SUB, group: str = GROUP, **headers: str
    ) -> httpx.Response:
        """PUT the subscriber batch (a str is sent as it is)."""
        body = items if isinstance(items, str) else dumps(items)
        path = f"/subscribers/{sub}/groups/{group}/accumulators-batch"
        return self.http.put(path, content=body, headers=headers)

    def plans(self, items: list[Any]) -> httpx.Response:
        """PUT the plan batch of PLAN."""
        return self.http.put(f"/plans/{PLAN}/accumulators-batch", content=dumps(items))

    def list(self, sub: str = SUB, group: str = GROUP, **params: Any) -> httpx.Response:
        """GET the pair's list."""
        return self.http.get(f"/subscribers/{sub}/groups/{group}/accumulators", params=params)

    def row_path(self, sub: str, group: str, code: str) -> str:
        """The path of one row (plan year 2026, type MED)."""
        return f"/subscribers/{sub}/groups/{group}/accumulators/2026/MED/{code}"


def items(answer: httpx.Response) -> dict[str, tuple[int, str]]:
    """A 207's items as benefit code (or accum name) -> (status, body)."""
    out = {}
    for item in loads(answer.content)["data"]:
        key = {kv["key"]: kv["value"] for kv in item["id"]}
        name = key.get("benefit_Code", key.get("accum_Name"))
        out[str(name)] = (item["status"], item["body"])
    return out


@pytest.fixture(scope="module")
def strict_sandbox() -> Iterator[SandboxHandle]:
    """A strict sandbox subprocess for the module."""
    with running_sandbox(dialect="strict", seed=7) as handle:
        yield handle


@pytest.fixture(scope="module")
def lax_sandbox() -> Iterator[SandboxHandle]:
    """A sandbox with the lax dialect, for the module."""
    with running_sandbox(dialect="lax", seed=7) as handle:
        yield handle


@pytest.fixture
def strict(strict_sandbox: SandboxHandle) -> Iterator[Vba]:
    """The strict sandbox, emptied, with a logged-in raw client."""
    strict_sandbox.admin.reset()
    vba = Vba(strict_sandbox.url)
    yield vba
    vba.http.close()


@pytest.fixture
def lax(lax_sandbox: SandboxHandle) -> Iterator[Vba]:
    """The lax sandbox, emptied, with a logged-in raw client."""
    lax_sandbox.admin.reset()
    vba = Vba(lax_sandbox.url)
    yield vba
    vba.http.close()


# -- 1. nulls the seeds don't allow ---------------------------------------------------------


def test_not_null_table_covers_every_field_of_the_models() -> None:
    """Every model field is non-nullable (NOT_NULL) or one of the seeds' "or null" fields."""
    users = {"entry_User", "update_User"}
    nullable: dict[type[Record], set[str]] = {
        SubscriberAccum: users | {"added_Accum"},
        PlanAccumulator: users | set(PLAN_LIMIT_FIELDS),
    }
    for model, allowed in nullable.items():
        assert set(NOT_NULL[model]).isdisjoint(allowed)
        assert set(NOT_NULL[model]) | allowed == set(model.model_fields)
    assert len([t for t in NOT_NULL[SubscriberAccum].values() if t == "System.Double"]) == 30


def test_strict_null_date_fails_the_whole_batch_as_model_binding(
    strict: Vba, strict_sandbox: SandboxHandle
) -> None:
    """A null entry_Date: 400 for the whole batch, ASP.NET ProblemDetails, nothing written."""
    body = dumps([record("A"), record("B", entry_Date=None)])
    answer = strict.batch(body)
    assert answer.status_code == 400
    assert answer.headers["content-type"].startswith("application/problem+json")
    problem = answer.json()
    assert list(problem) == ["type", "title", "status", "errors", "traceId"]
    assert problem["type"] == "https://tools.ietf.org/html/rfc9110#section-15.5.1"
    assert problem["title"] == "One or more validation errors occurred."
    assert problem["status"] == 400 and TRACE_ID.match(problem["traceId"])
    at = body.index('"entry_Date":null') + len('"entry_Date":null')
    message = (
        "The JSON value could not be converted to System.DateTime. Path: $[1].entry_Date"
        f" | LineNumber: 0 | BytePositionInLine: {at}."
    )
    assert problem["errors"] == {"$[1].entry_Date": [message]}
    assert strict_sandbox.admin.rows() == [] and strict_sandbox.admin.journal() == []


@pytest.mark.parametrize(
    ("method", "path", "body", "key"),
    [
        ("POST", "", record(update_Date=None), "$.update_Date"),
        ("PUT", "/2026/MED/DED", record(copay_Amt=None), "$.copay_Amt"),
        ("PUT", "-batch", [record(), record("B", allowed_Amt_OON=None)], "$[1].allowed_Amt_OON"),
    ],
)
def test_strict_null_amount_or_date_fails_every_write_endpoint(
    strict: Vba, method: str, path: str, body: Any, key: str
) -> None:
    """Create, update and batch all refuse a null amount or date before VBA's code runs."""
    url = f"/subscribers/{SUB}/groups/{GROUP}/accumulators{path}"
    answer = strict.http.request(method, url, content=dumps(body))
    assert answer.status_code == 400
    errors = answer.json()["errors"]
    assert list(errors) == [key] and "could not be converted to System." in errors[key][0]


def test_strict_null_key_string_is_a_required_field_error(strict: Vba) -> None:
    """A null key string binds (a .NET string may be null), then fails [Required]: 400."""
    answer = strict.plans([plan(), plan(accum_Name=None)])
    assert answer.status_code == 400
    assert answer.json()["errors"] == {"[1].Accum_Name": ["The Accum_Name field is required."]}


def test_strict_nullable_and_absent_fields_are_accepted(strict: Vba) -> None:
    """Nulls the seeds allow (users, added_Accum, plan limits) and absent dates are fine."""
    row = record(added_Accum=None, entry_User=None, update_User=None)
    assert items(strict.batch([row])) == {"DED": (201, "Created")}
    answer = strict.plans([plan(annual_Max=None, entry_User=None)])
    assert items(answer) == {"ACC": (201, "Created")}


def test_lax_null_date_is_accepted_and_null_amount_fails_only_its_item(lax: Vba) -> None:
    """Lax (unchanged): a null date is ignored; a null amount is one item's 400."""
    answer = lax.batch([record("A", entry_Date=None), record("B", copay_Amt=None)])
    assert answer.status_code == 207
    result = items(answer)
    assert result["A"] == (201, "Created") and result["B"][0] == 400


# -- 2. 207 id spelling ---------------------------------------------------------------------


def test_camel_id_spelling_names_the_207_keys_in_camel_case() -> None:
    """id_spelling=camel: subscriberID, groupID, planYear, planType, benefitCode; planID..."""
    with running_sandbox(id_spelling="camel") as handle:
        vba = Vba(handle.url)
        sub = loads(vba.batch([record()]).content)["data"][0]["id"]
        assert [kv["key"] for kv in sub] == [
            "subscriberID",
            "groupID",
            "planYear",
            "planType",
            "benefitCode",
        ]
        assert [kv["value"] for kv in sub] == [SUB, GROUP, "2026", "MED", "DED"]
        plans = loads(vba.plans([plan()]).content)["data"][0]["id"]
        assert [kv["key"] for kv in plans] == ["planID", "accumName"]
        vba.http.close()


def test_exact_id_spelling_is_the_seeds(strict: Vba) -> None:
    """By default (either dialect) a 207 item's id spells keys as the seeds do."""
    sub = loads(strict.batch([record()]).content)["data"][0]["id"]
    assert [kv["key"] for kv in sub] == list(SubscriberAccum.KEY)


# -- 3. SQL Server's collation --------------------------------------------------------------


def test_strict_keys_compare_as_sql_server_and_keep_their_first_spelling(
    strict: Vba, strict_sandbox: SandboxHandle
) -> None:
    """A key differing by case or trailing spaces updates that row, which keeps its casing."""
    assert items(strict.batch([record("Ded")])) == {"Ded": (201, "Created")}
    other = record("DED  ", sub="ABC123", group="grp-a", copay_Amt=Decimal("5.00"))
    answer = strict.batch([other], sub="ABC123 ", group="GRP-A")
    assert answer.status_code == 207
    ident = loads(answer.content)["data"][0]
    assert (ident["status"], ident["body"]) == (200, "Updated")
    assert [kv["value"] for kv in ident["id"]] == [SUB, GROUP, "2026", "MED", "Ded"]
    [row] = strict_sandbox.admin.rows()
    assert (row["subscriber_ID"], row["benefit_Code"], row["copay_Amt"]) == (
        SUB,
        "Ded",
        Decimal("5.00"),
    )
    listed = loads(strict.list(sub="ABC123", group="grp-a ").content)["data"]
    assert [(r["subscriber_ID"], r["group_ID"], r["benefit_Code"]) for r in listed] == [
        (SUB, GROUP, "Ded")
    ]
    got = strict.http.get(strict.row_path("ABC123", "GRP-a", "dED"))
    assert got.status_code == 200 and got.json()["data"]["benefit_Code"] == "Ded"
    keys = [w["key"]["benefit_Code"] for w in strict_sandbox.admin.journal()]
    assert keys == ["Ded", "Ded"]


def test_strict_update_create_and_delete_compare_keys_the_same_way(strict: Vba) -> None:
    """PUT, a second POST (409) and DELETE find the row by a differently cased key."""
    url = f"/subscribers/{SUB}/groups/{GROUP}/accumulators"
    assert strict.http.post(url, content=dumps(record())).status_code == 200
    again = record(sub=SUB.upper(), group=GROUP.lower())
    assert strict.http.post(url, content=dumps(again)).status_code == 409
    path = strict.row_path(SUB.upper(), GROUP, "ded")
    updated = strict.http.put(path, content=dumps(record("DED ", copay_Amt=Decimal(2))))
    assert updated.status_code == 200 and updated.json()["data"]["benefit_Code"] == "DED"
    assert strict.http.delete(path).status_code == 204
    assert strict.http.get(path).status_code == 404


def test_strict_admin_seed_and_adjust_compare_keys_the_strict_way(
    strict_sandbox: SandboxHandle,
) -> None:
    """/_admin/seed and /_admin/adjust: the first writer's casing wins, keys compare strictly."""
    admin = strict_sandbox.admin
    strict_sandbox.admin.reset()
    admin.seed([record("Ded")])
    admin.seed([record("DED", sub=SUB.upper(), copay_Amt=Decimal(1))])
    key = record("ded ", group=GROUP.upper())
    key = {f: key[f] for f in SubscriberAccum.KEY}
    admin.adjust(key, {"copay_Amt": Decimal(2)})
    [row] = admin.rows()
    assert (row["subscriber_ID"], row["benefit_Code"], row["copay_Amt"]) == (SUB, "Ded", 3)


def test_lax_keys_compare_exactly(lax: Vba, lax_sandbox: SandboxHandle) -> None:
    """Lax (unchanged): a key differing by case is another row."""
    lax.batch([record("Ded")])
    answer = lax.batch([record("DED", sub=SUB.upper())], sub=SUB.upper())
    assert items(answer) == {"DED": (201, "Created")}
    assert len(lax_sandbox.admin.rows()) == 2
    assert lax.http.get(lax.row_path(SUB, GROUP, "DED")).status_code == 404


# -- 4. list order --------------------------------------------------------------------------


def test_strict_list_without_sort_by_is_shuffled_and_sort_by_pages_exactly(
    strict: Vba, strict_sandbox: SandboxHandle
) -> None:
    """No sortBy: each list has its own order. sortBy with ties: pages neither skip nor repeat."""
    codes = [f"B{i:02}" for i in range(30)]
    strict_sandbox.admin.seed([record(code) for code in codes])
    orders = {tuple(r["benefit_Code"] for r in strict.list().json()["data"]) for _ in range(4)}
    assert len(orders) > 1 and all(sorted(o) == codes for o in orders)
    seen = []
    for page in range(1, 6):
        answer = strict.list(sortBy="plan_Type:desc", page=page, pageSize=7)
        seen += [r["benefit_Code"] for r in answer.json()["data"]]
    assert seen == codes  # every row ties on plan_Type: the key breaks the tie


def test_lax_list_without_sort_by_is_in_key_order(lax: Vba, lax_sandbox: SandboxHandle) -> None:
    """Lax (unchanged): without sortBy the list is in key order, every time."""
    codes = [f"B{i:02}" for i in range(10)]
    lax_sandbox.admin.seed([record(code) for code in reversed(codes)])
    for _ in range(3):
        assert [r["benefit_Code"] for r in lax.list().json()["data"]] == codes


# -- 5. negative amounts --------------------------------------------------------------------


def test_strict_negative_amount_fails_its_item_only(
    strict: Vba, strict_sandbox: SandboxHandle
) -> None:
    """A batch item with an amount below 0 is a 400 naming the field; the rest is written."""
    answer = strict.batch([record("A", deductible_Used=Decimal("-1.00")), record("B")])
    assert items(answer) == {"A": (400, NEGATIVE), "B": (201, "Created")}
    assert [r["benefit_Code"] for r in strict_sandbox.admin.rows()] == ["B"]
    limits = items(strict.plans([plan(annual_Max=Decimal("-5"))]))
    assert limits == {"ACC": (400, "annual_Max: must not be negative")}


def test_strict_negative_amount_fails_a_create(strict: Vba) -> None:
    """Create with an amount below 0: 400 in VBA's envelope with ProblemDetails."""
    url = f"/subscribers/{SUB}/groups/{GROUP}/accumulators"
    answer = strict.http.post(url, content=dumps(record(deductible_Used=Decimal("-0.01"))))
    assert answer.status_code == 400
    envelope = answer.json()
    assert envelope["data"] is None and envelope["debug"]["activityId"]
    assert envelope["error"]["status"] == 400 and envelope["error"]["detail"] == NEGATIVE


def test_lax_negative_amount_is_written(lax: Vba) -> None:
    """Lax (unchanged): a negative amount is written like any other."""
    answer = lax.batch([record("A", deductible_Used=Decimal("-1.00"))])
    assert items(answer) == {"A": (201, "Created")}


# -- 6. more than 2 decimals ----------------------------------------------------------------


def test_strict_keeps_every_decimal_sent(strict: Vba, strict_sandbox: SandboxHandle) -> None:
    """Strict stores 10.125 as sent and echoes it in lists, gets and /_admin/rows."""
    strict.batch([record(copay_Amt=Decimal("10.125"), coins_Amt=Decimal("0.001"))])
    [listed] = loads(strict.list().content)["data"]
    got = loads(strict.http.get(strict.row_path(SUB, GROUP, "DED")).content)["data"]
    [row] = strict_sandbox.admin.rows()
    for seen in (listed, got, row):
        assert (seen["copay_Amt"], seen["coins_Amt"]) == (Decimal("10.125"), Decimal("0.001"))
    assert '"copay_Amt":10.125' in strict.list().text


def test_strict_exact_amounts_survive_adjust_intrusion_and_restart(tmp_path: Path) -> None:
    """VBA's own writes (adjust, intrusion) keep every digit, and so does the state file."""
    with running_sandbox(dialect="strict", state=tmp_path / "state.db") as handle:
        key = {f: record()[f] for f in SubscriberAccum.KEY}
        handle.admin.adjust(key, {"copay_Amt": Decimal("0.005")})
        handle.admin.intrude("list", SUB.upper(), GROUP, {"copay_Amt": Decimal("1.0001")})
        vba = Vba(handle.url)
        assert vba.list().status_code == 200
        vba.http.close()
        assert handle.admin.intrusions() == []
        handle.stop()
        handle.start()
        [row] = handle.admin.rows()
        assert row["copay_Amt"] == Decimal("1.0051") and row["subscriber_ID"] == SUB


def test_lax_rounds_to_cents(lax: Vba, lax_sandbox: SandboxHandle) -> None:
    """Lax (unchanged): amounts sent with more than 2 decimals are rounded half-even."""
    lax.batch([record(copay_Amt=Decimal("10.125"))])
    assert lax_sandbox.admin.rows()[0]["copay_Amt"] == Decimal("10.12")
    assert '"copay_Amt":10.12,' in lax.list().text


# -- 7. the gateway's 403 -------------------------------------------------------------------


def test_strict_missing_api_key_is_the_gateways_403(strict: Vba) -> None:
    """No x-api-key: 403 {"message": "Forbidden"}, as for a wrong one."""
    del strict.http.headers["x-api-key"]
    answer = strict.list()
    assert (answer.status_code, answer.json()) == (403, {"message": "Forbidden"})


def test_lax_missing_api_key_is_401(lax: Vba) -> None:
    """Lax (unchanged): no x-api-key is a 401."""
    del lax.http.headers["x-api-key"]
    answer = lax.list()
    assert (answer.status_code, answer.json()) == (401, {"message": "Unauthorized"})


# -- 8. an unknown subscriber ---------------------------------------------------------------


def test_strict_unknown_subscriber_lists_404(strict: Vba) -> None:
    """No row of the subscriber in any group: 404 Subscriber not found; another group: []."""
    answer = strict.list()
    assert answer.status_code == 404
    error = answer.json()["error"]
    assert (error["title"], error["detail"]) == ("Not Found", "Subscriber not found")
    strict.batch([record(group="OTHER")], group="OTHER")
    empty = strict.list(sub=SUB.upper())
    assert (empty.status_code, empty.json()["data"]) == (200, [])


def test_lax_unknown_subscriber_lists_empty(lax: Vba) -> None:
    """Lax (unchanged): an unknown subscriber's list is empty."""
    answer = lax.list()
    assert (answer.status_code, answer.json()["data"]) == (200, [])


# -- 9. Accept ------------------------------------------------------------------------------


def test_strict_accept_must_admit_the_answers_media_type(
    strict: Vba, strict_sandbox: SandboxHandle
) -> None:
    """Accept without text/plain (or a wildcard) gets 406 from a batch; nothing is written."""
    refused = strict.batch([record()], accept="application/json")
    assert refused.status_code == 406
    assert refused.json()["error"]["title"] == "Not Acceptable"
    assert strict_sandbox.admin.rows() == []
    for accept in ("text/plain", "*/*", "text/*", "application/json, text/plain;q=0.5"):
        assert strict.batch([record()], accept=accept).status_code == 207
    assert strict.batch([record()], accept="text/plain;q=0").status_code == 406
    assert strict.list(sub=SUB).status_code == 200  # httpx sends */*
    listed = strict.http.get(f"/subscribers/{SUB}/groups/{GROUP}/accumulators")
    assert listed.status_code == 200
    text_only = strict.http.get(listed.url, headers={"accept": "text/plain"})
    assert text_only.status_code == 406


def test_lax_ignores_accept(lax: Vba) -> None:
    """Lax (unchanged): a batch answers 207 whatever the Accept header says."""
    assert lax.batch([record()], accept="application/json").status_code == 207
