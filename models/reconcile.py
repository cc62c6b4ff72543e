"""Reconcile: is VBA right? One key's store state against VBA's row and the ledger, judged.

Pure: the rows come in as cents (store columns), the verdict goes out. ``worker.ops.reconcile``
reads and writes; this decides.

- **exclusive** ownership: VBA's row must equal our confirmed total (``pushed``), field by field.
- **shared** ownership: VBA's row is its own share plus ours; its own share (remote - pushed) is
  never below zero. Below zero, our share was erased or overwritten (VBA reset or rebuilt the
  row); a row absent where we confirmed money is the same, for every field.
- **the ledger against itself**: the claims' current states summed per key equal ``ours``.

Keys with a write in flight (an intent of unknown outcome) or held for a person are reported as
such and not judged: VBA may rightly show either value until the flush settles them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Literal

from models.buckets import COLUMN_TO_VBA, COLUMNS
from models.sync import money

Cents = Mapping[str, int]
Ownership = Literal["shared", "exclusive"]


class Finding(StrEnum):
    """A key's verdict. The first three are drift an operator acts on."""

    DRIFTED = "drifted"  # VBA's row differs from what we confirmed (exclusive)
    MISSING = "missing"  # we confirmed money, VBA has no row for the key
    BELOW = "below_share"  # VBA's own share is negative: ours was erased or overwritten (shared)
    LEDGER = "ledger"  # the claims do not add up to our total: a defect of ours, not VBA's
    EQUAL = "equal"
    IN_FLIGHT = "in_flight"  # a write of unknown outcome: the flush settles it first
    HELD = "held"  # waits for an operator (dead-letters resolve)
    UNREADABLE = "unreadable"  # VBA's row can't be read as money


DRIFT = frozenset({Finding.DRIFTED, Finding.MISSING, Finding.BELOW, Finding.LEDGER})
REPAIRABLE = frozenset({Finding.DRIFTED, Finding.MISSING, Finding.BELOW})


@dataclass(frozen=True, slots=True)
class FieldDiff:
    """One VBA field that is not as it should be: what was found (VBA's value; for the ledger,
    our total), what it should be (our confirmed share; the claims' sum), and for shared
    ownership VBA's own share."""

    field: str
    found: str
    expected: str
    vba_own: str | None = None


@dataclass(frozen=True, slots=True)
class Verdict:
    finding: Finding
    fields: tuple[FieldDiff, ...] = ()
    ledger: tuple[FieldDiff, ...] = field(default=())

    @property
    def drift(self) -> bool:
        return self.finding in DRIFT


def judge(
    ownership: Ownership,
    ours: Cents,
    pushed: Cents,
    remote: Cents | None,
    ledger: Cents,
    *,
    in_flight: bool = False,
    held: bool = False,
) -> Verdict:
    """The verdict on one key: ``remote`` is VBA's row (None: VBA has none), ``ledger`` the
    claims' sum. A ledger disagreement is reported whatever VBA shows."""
    broken = tuple(
        FieldDiff(COLUMN_TO_VBA[c], money(ours[c]), money(ledger[c]))
        for c in COLUMNS
        if ours[c] != ledger[c]
    )
    if held:
        return Verdict(Finding.HELD, ledger=broken)
    if in_flight:
        return Verdict(Finding.IN_FLIGHT, ledger=broken)
    found = _against_vba(ownership, pushed, remote)
    if found.finding is Finding.EQUAL and broken:
        return Verdict(Finding.LEDGER, ledger=broken)
    return Verdict(found.finding, found.fields, broken)


def _against_vba(ownership: Ownership, pushed: Cents, remote: Cents | None) -> Verdict:
    if remote is None:
        if any(pushed[c] for c in COLUMNS):
            lost = tuple(
                FieldDiff(COLUMN_TO_VBA[c], "absent", money(pushed[c]))
                for c in COLUMNS
                if pushed[c]
            )
            return Verdict(Finding.MISSING, lost)
        return Verdict(Finding.EQUAL)
    if ownership == "exclusive":
        diffs = tuple(
            FieldDiff(COLUMN_TO_VBA[c], money(remote[c]), money(pushed[c]))
            for c in COLUMNS
            if remote[c] != pushed[c]
        )
        return Verdict(Finding.DRIFTED if diffs else Finding.EQUAL, diffs)
    below = tuple(
        FieldDiff(
            COLUMN_TO_VBA[c],
            money(remote[c]),
            f">= {money(pushed[c])}",
            vba_own=money(remote[c] - pushed[c]),
        )
        for c in COLUMNS
        if remote[c] < pushed[c]
    )
    return Verdict(Finding.BELOW if below else Finding.EQUAL, below)


@dataclass(frozen=True, slots=True)
class Repair:
    """What a repair may set our confirmed share to (``pushed``), and the fields whose evidence
    can't tell which share survived (``undecided``: then nothing is repaired, the key is held
    for a person)."""

    pushed: dict[str, int]
    undecided: tuple[str, ...] = ()


def repaired_pushed(ownership: Ownership, pushed: Cents, remote: Cents | None) -> Repair:
    """Our confirmed share as VBA's row shows it now, field by field, for a key the operator
    repairs: the next flush then sends from there under the normal protocol.

    Exclusive: VBA holds what it shows (nothing, when the row is gone). Shared: a field at or
    above our confirmed share keeps it; a field VBA shows at zero holds nothing of ours (nor of
    VBA's); a field between zero and our share can't tell which share survived (VBA reset it and
    re-added its own, or lowered ours): undecided, and the repair holds the key for a person
    (as the flush does), who settles those fields with ``dead-letters resolve``. A row absent
    holds nothing of ours: the caller repairs that only after reading the absence twice.
    """
    if remote is None:
        return Repair(dict.fromkeys(COLUMNS, 0))
    if ownership == "exclusive":
        return Repair({c: remote[c] for c in COLUMNS})
    below = [c for c in COLUMNS if remote[c] < pushed[c]]
    repaired = {c: 0 if c in below else pushed[c] for c in COLUMNS}
    return Repair(repaired, tuple(c for c in below if remote[c] > 0))
