"""The flush's view of VBA's listed rows: two rows of one canonical key are refused."""

from __future__ import annotations

from decimal import Decimal

from models.buckets import VBA_FIELDS
from models.vba import RemoteAccum
from worker.flush.protocol import Remote

KEYS = {"subscriber_ID": "S1", "group_ID": "G1", "plan_Year": "2026", "plan_Type": "MED"}


def row(code: str, amount: str = "0") -> RemoteAccum:
    return RemoteAccum.from_vba(KEYS | {"benefit_Code": code} | dict.fromkeys(VBA_FIELDS, amount))


def test_two_listed_rows_of_one_canonical_key_are_refused_not_merged() -> None:
    """A case-sensitive VBA could list "DED" and "ded" as two rows; our ledger has one key for
    both. Which one a write would land on can't be told: the key is unreadable (refused, a
    dead letter), never one of the rows silently taken for it."""
    remote = Remote()
    remote.add(row("DED", "1.00"))
    remote.add(row("ded", "2.00"))
    remote.add(row("OOP", "3.00"))
    key = ("S1", "G1", "2026", "MED", "DED")
    assert key not in remote.rows and "two rows" in remote.unreadable[key]
    assert remote.rows[(*key[:4], "OOP")].amounts()["copay_Amt"] == Decimal("3.00")


def test_a_row_seen_twice_as_it_was_is_one_row() -> None:
    """Paging may show one row on two pages; unchanged, it is the same row."""
    remote = Remote()
    remote.add(row("DED", "1.00"))
    remote.add(row("DED", "1.00"))
    assert remote.unreadable == {} and len(remote.rows) == 1
