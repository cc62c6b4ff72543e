"""Reconcile's judgement (models/reconcile.py), pure: each finding on plain values, and for
every input, a repaired key that one flush rewrites is then judged equal."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from models.buckets import COLUMNS
from models.reconcile import Finding, judge, repaired_pushed
from models.sync import target
from worker.schedule import beat_schedule
from worker.settings import Settings

ZERO = dict.fromkeys(COLUMNS, 0)


def cents(**values: int) -> dict[str, int]:
    return ZERO | values


HUNDRED = cents(deductible_total=10_000, deductible_in=10_000)


@pytest.mark.parametrize(
    ("ownership", "remote", "finding", "fields"),
    [
        ("exclusive", HUNDRED, Finding.EQUAL, []),
        ("exclusive", HUNDRED | {"deductible_total": 10_500}, Finding.DRIFTED, ["deductible_Used"]),
        ("exclusive", None, Finding.MISSING, ["deductible_Used", "ded_PPO_Used"]),
        ("shared", HUNDRED | {"copay_total": 700, "copay_in": 700}, Finding.EQUAL, []),
        ("shared", HUNDRED | {"deductible_total": 9_000}, Finding.BELOW, ["deductible_Used"]),
        ("shared", None, Finding.MISSING, ["deductible_Used", "ded_PPO_Used"]),
    ],
)
def test_each_finding(
    ownership: str, remote: dict[str, int] | None, finding: Finding, fields: list[str]
) -> None:
    verdict = judge(ownership, HUNDRED, HUNDRED, remote, HUNDRED)  # type: ignore[arg-type]
    assert verdict.finding is finding
    assert [d.field for d in verdict.fields] == fields


def test_below_share_names_vba_s_own_share() -> None:
    verdict = judge("shared", HUNDRED, HUNDRED, HUNDRED | {"deductible_total": 7_000}, HUNDRED)
    (diff,) = verdict.fields
    assert (diff.found, diff.expected, diff.vba_own) == ("70.00", ">= 100.00", "-30.00")


def test_a_key_with_nothing_confirmed_and_no_row_is_equal() -> None:
    assert judge("exclusive", ZERO, ZERO, None, ZERO).finding is Finding.EQUAL


def test_the_ledger_is_judged_whatever_vba_shows() -> None:
    claims = HUNDRED | {"deductible_total": 9_999}
    verdict = judge("exclusive", HUNDRED, HUNDRED, HUNDRED, claims)
    assert verdict.finding is Finding.LEDGER
    assert [(d.field, d.found, d.expected) for d in verdict.ledger] == [
        ("deductible_Used", "100.00", "99.99")
    ]
    drifted = judge("exclusive", HUNDRED, HUNDRED, None, claims)
    assert drifted.finding is Finding.MISSING and drifted.ledger  # both are reported


def test_keys_in_flight_or_held_are_not_judged() -> None:
    other = HUNDRED | {"deductible_total": 1}
    assert judge("exclusive", HUNDRED, HUNDRED, other, HUNDRED, in_flight=True).finding is (
        Finding.IN_FLIGHT
    )
    assert judge("shared", HUNDRED, HUNDRED, None, HUNDRED, held=True).finding is Finding.HELD


money = st.integers(0, 10**8)
rows = st.fixed_dictionaries({c: money for c in COLUMNS})


@given(st.sampled_from(["shared", "exclusive"]), rows, rows, st.none() | rows)
def test_a_repaired_key_is_equal_after_one_flush(
    ownership: str, ours: dict[str, int], pushed: dict[str, int], remote: dict[str, int] | None
) -> None:
    """Whatever VBA showed, repair then one flush (target from the repaired share, written,
    confirmed) leaves a key reconcile judges equal: never below our share, never drifted. (A
    field the repair can't settle holds the key instead: nothing is written for it.)"""
    repair = repaired_pushed(ownership, pushed, remote)  # type: ignore[arg-type]
    if repair.undecided:
        return
    written = target(ours, repair.pushed, remote, ownership)  # type: ignore[arg-type]
    assert all(v >= 0 for v in written.values())
    after = judge(ownership, ours, ours, written, ours)  # type: ignore[arg-type]
    assert after.finding is Finding.EQUAL


def one(column: str, cents: int) -> dict[str, int]:
    return dict.fromkeys(COLUMNS, 0) | {column: cents}


def test_a_repair_of_a_row_below_our_share_acts_field_by_field() -> None:
    """VBA lowered one field: only that field's confirmed share changes. At zero, nothing of
    ours (nor of VBA's) is there: repaired to 0. Between zero and our share, the row can't tell
    which share survived: undecided (the key is held for a person), nothing repaired. Before,
    every one of the 30 fields went to 0, and the next flush added our whole share on top of
    the fields VBA had not touched (copay 60.00 where the truth was 30.00)."""
    pushed = one("copay_total", 3000) | one("copay_in", 3000) | {"deductible_total": 5000}
    pushed["deductible_in"] = 5000
    zeroed = pushed | {"deductible_total": 0, "deductible_in": 0}
    repair = repaired_pushed("shared", pushed, zeroed)
    assert repair.undecided == () and repair.pushed == pushed | {
        "deductible_total": 0,
        "deductible_in": 0,
    }
    lowered = pushed | {"deductible_total": 2000, "deductible_in": 2000}
    repair = repaired_pushed("shared", pushed, lowered)
    assert repair.undecided == ("deductible_total", "deductible_in")


def test_beat_runs_reconcile_only_when_asked() -> None:
    assert "reconcile" not in beat_schedule(Settings(_env_file=None))  # type: ignore[call-arg]
    entry = beat_schedule(Settings(_env_file=None, reconcile_cron="30 2 * * *"))  # type: ignore[call-arg]
    assert entry["reconcile"]["task"] == "accumsync.reconcile"
    assert entry["reconcile"]["schedule"].hour == {2}


@pytest.mark.parametrize("bad", ["30 2 * *", "61 2 * * *", "x y z w v"])
def test_a_bad_crontab_is_refused_naming_the_rule(bad: str) -> None:
    with pytest.raises(ValueError, match="reconcile_cron"):
        Settings(_env_file=None, reconcile_cron=bad)  # type: ignore[call-arg]


def test_reconcile_leaves_the_flush_its_rate() -> None:
    with pytest.raises(ValueError, match="ACCUMSYNC_RECONCILE_RATE"):
        Settings(_env_file=None, reconcile_rate=25)  # type: ignore[call-arg]
