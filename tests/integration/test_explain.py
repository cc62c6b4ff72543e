"""``accumsync explain``: a member's totals and the claims that make them add up to the cent,
after replacements, a reversal and a move; what VBA confirmed; nothing of it logged."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from decimal import Decimal
from typing import Any

import pytest

from tests.stack import Stack
from worker.demo.sandboxes import SandboxHandle

pytestmark = pytest.mark.integration

SUB, GROUP = "S00000321", "GRP9"
# amount -> VBA fields it feeds (total, in-network, out-of-network): the contract's table.
FIELDS = {
    "deductible": ("deductible_Used", "ded_PPO_Used", "deductible_Used_OON"),
    "copay": ("copay_Amt", "copay_Amt_Net", "copay_Amt_OON"),
}


def version(
    claim: str,
    v: int,
    benefit: str = "DED",
    network: str = "in",
    status: str = "adjudicated",
    **amounts: str,
) -> dict[str, Any]:
    return {
        "event_id": f"{claim}-v{v}",
        "claim_id": claim,
        "version": v,
        "status": status,
        "subscriber_id": SUB,
        "group_id": GROUP,
        "plan_year": "2026",
        "plan_type": "MED",
        "benefit_code": benefit,
        "network": network,
        "amounts": amounts,
    }


HISTORY = [
    version("c1", 1, deductible="100.00", copay="20.00"),
    version("c1", 2, deductible="120.00", copay="20.00"),  # replaced
    version("c2", 1, deductible="55.55"),
    version("c2", 2, status="reversed"),  # reversed: counts nothing
    version("c3", 1, deductible="30.00"),
    version("c3", 2, benefit="OOP", deductible="30.00"),  # moved to another accumulator
    version("c4", 1, network="out", deductible="40.10", copay="9.99"),
    version("c5", 1, benefit="OOP", copay="12.34"),
]


def test_the_claims_listed_add_up_to_each_total_to_the_cent(
    flush_stack: Callable[..., Stack], sandboxes: Callable[..., SandboxHandle]
) -> None:
    sandbox = sandboxes()
    stack = flush_stack(sandbox, ownership="exclusive")
    stack.worker("w1")
    for event in HISTORY:  # one at a time: each version after the one it replaces
        stack.publish([event])
    stack.flush_wait()

    proc = stack.cli("explain", "--subscriber", SUB.lower(), "--group", GROUP, "--json")
    assert proc.stderr == ""  # member data on stdout, to the terminal; nothing logged
    story = json.loads(proc.stdout)
    keys = {k["benefit_code"]: k for k in story["keys"]}
    assert sorted(keys) == ["DED", "OOP"]
    listed = {b: {(c["claim_id"], c["version"]) for c in k["claims"]} for b, k in keys.items()}
    assert listed == {"DED": {("c1", 2), ("c4", 1)}, "OOP": {("c3", 2), ("c5", 1)}}
    c1 = next(c for c in keys["DED"]["claims"] if c["claim_id"] == "c1")
    assert c1["versions_received"] == [1, 2] and c1["amounts"]["deductible"] == "120.00"

    vba = {r["benefit_Code"]: r for r in sandbox.admin.rows()}
    for benefit, key in keys.items():
        summed: dict[str, Decimal] = {}
        for claim in key["claims"]:
            for amount, value in claim["amounts"].items():
                total, net, oon = FIELDS[amount]
                for field in (total, net if claim["network"] == "in" else oon):
                    summed[field] = summed.get(field, Decimal(0)) + Decimal(value)
        ours = {f["field"]: Decimal(f["ours"]) for f in key["totals"] if Decimal(f["ours"])}
        assert ours == summed, benefit
        assert key["adds_up"]
        for f in key["totals"]:
            assert f["confirmed"] == f["ours"] == f["claims"]
            assert Decimal(str(vba[benefit][f["field"]])) == Decimal(f["ours"])
        assert key["state"]["what"] == "VBA holds what we confirmed"
    assert keys["DED"]["totals"][0] == {
        "field": "copay_Amt",
        "ours": "29.99",
        "confirmed": "29.99",
        "claims": "29.99",
    }
    assert story["pair"]["last_activity_id"]

    text = stack.cli("explain", "--subscriber", SUB, "--group", GROUP, "--benefit", "oop").stdout
    # The claims table's first column (a bare "c1" would also match a random activity id).
    assert set(re.findall(r"│ (c\d+) +│", text)) == {"c3", "c5"} and "12.34" in text, text


def test_an_unknown_member_is_said_plainly(
    flush_stack: Callable[..., Stack], sandboxes: Callable[..., SandboxHandle]
) -> None:
    stack = flush_stack(sandboxes())
    proc = stack.cli("explain", "--subscriber", "NOPE", "--group", "G", check=False)
    assert proc.returncode == 1 and "no accumulators here" in proc.stderr
