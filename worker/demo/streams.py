"""Realistic ClaimEvent v1 streams and an independent oracle of the totals they imply.

The demo, the tests and the benchmarks draw their events here. ``expected_totals`` computes the
VBA field values straight from the raw events (highest version per claim wins, reversed adds
nothing) in Decimal, without the ledger code, so it can check that code.
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import date, timedelta
from decimal import Decimal
from typing import Any

from models.buckets import BUCKETS

PLAN_TYPES = ("MED", "RX", "DEN")
BENEFITS = {"MED": ("DED", "OOP", "OV"), "RX": ("RXGEN", "RXBRD"), "DEN": ("PREV",)}
CENT = Decimal("0.01")


@dataclass(frozen=True)
class StreamSpec:
    """What to generate: ``events`` in all, over ``members`` subscribers."""

    events: int = 5_000
    members: int = 300
    groups: int = 5
    plan_year: str = "2026"
    duplicate_rate: float = 0.05
    replace_rate: float = 0.15
    reverse_rate: float = 0.04
    move_rate: float = 0.02
    invalid: int = 0
    seed: int = 7


def _money(rng: random.Random, hi: int) -> str:
    return str((Decimal(rng.randint(0, hi * 100)) * CENT).quantize(CENT))


def _amounts(rng: random.Random) -> dict[str, str]:
    allowed = rng.randint(1_000, 250_000)
    picks = rng.sample([b.amount for b in BUCKETS if b.amount != "allowed"], k=rng.randint(2, 6))
    out = {"allowed": str((Decimal(allowed) * CENT).quantize(CENT))}
    for name in picks:
        out[name] = _money(rng, max(1, allowed // 300))
    return out


def _claim(rng: random.Random, spec: StreamSpec, n: int) -> dict[str, Any]:
    member = rng.randrange(spec.members)
    plan_type = rng.choice(PLAN_TYPES)
    return {
        "event_id": f"evt-{n:08d}-v0",
        "claim_id": f"clm-{n:08d}",
        "version": 0,
        "status": "adjudicated",
        "subscriber_id": f"S{member:07d}",
        "group_id": f"GRP{member % spec.groups:03d}",
        "plan_year": spec.plan_year,
        "plan_type": plan_type,
        "benefit_code": rng.choice(BENEFITS[plan_type]),
        "network": "in" if rng.random() < 0.8 else "out",
        "member_seq": f"{rng.randint(1, 4):02d}",
        "service_date": str(date(2026, 1, 1) + timedelta(days=rng.randrange(300))),
        "amounts": _amounts(rng),
    }


def _next_version(rng: random.Random, spec: StreamSpec, last: dict[str, Any]) -> dict[str, Any]:
    v = last["version"] + 1
    event = dict(last, version=v, event_id=f"{last['claim_id']}-v{v}".replace("clm", "evt"))
    roll = rng.random()
    if roll < spec.reverse_rate / max(spec.replace_rate, 1e-9):
        return dict(event, status="reversed")
    event["status"] = "adjudicated"
    event["amounts"] = _amounts(rng)
    if rng.random() < spec.move_rate / max(spec.replace_rate, 1e-9):
        event["benefit_code"] = rng.choice(BENEFITS[event["plan_type"]])
        event["network"] = "out" if event["network"] == "in" else "in"
    return event


INVALID_MUTATIONS = (
    ("amounts", {"copay": "12.345"}),
    ("amounts", {"deductible": "-5.00"}),
    ("subscriber_id", "S1234567890"),
    ("network", "partner"),
    ("version", "two"),
    ("status", "paid"),
)


def generate(spec: StreamSpec) -> list[dict[str, Any]]:
    """A shuffled stream: new claims, replacements, reversals, key moves, duplicates, invalids."""
    rng = random.Random(spec.seed)
    unique = int(spec.events * (1 - spec.duplicate_rate)) - spec.invalid
    out: list[dict[str, Any]] = []
    lasts: list[dict[str, Any]] = []
    n = 0
    while len(out) < unique:
        if lasts and rng.random() < spec.replace_rate:
            i = rng.randrange(len(lasts))
            lasts[i] = _next_version(rng, spec, lasts[i])
            out.append(lasts[i])
        else:
            lasts.append(_claim(rng, spec, n))
            out.append(lasts[-1])
            n += 1
    out += [dict(rng.choice(out)) for _ in range(spec.events - spec.invalid - len(out))]
    for i in range(spec.invalid):
        field, value = INVALID_MUTATIONS[i % len(INVALID_MUTATIONS)]
        bad = dict(rng.choice(out), event_id=f"bad-{i:05d}", claim_id=f"bad-{i:05d}")
        bad[field] = value
        out.append(bad)
    rng.shuffle(out)
    return out


Key = tuple[str, str, str, str, str]


def expected_totals(events: Iterable[dict[str, Any]]) -> dict[Key, dict[str, Decimal]]:
    """VBA field -> amount per key, from valid events only (caller passes the valid ones)."""
    winners: dict[str, dict[str, Any]] = {}
    for e in events:
        best = winners.get(e["claim_id"])
        if best is None or e["version"] > best["version"]:
            winners[e["claim_id"]] = e
    totals: dict[Key, dict[str, Decimal]] = {}
    for e in winners.values():
        key = (e["subscriber_id"], e["group_id"], e["plan_year"], e["plan_type"], e["benefit_code"])
        row = totals.setdefault(key, {f: Decimal("0.00") for b in BUCKETS for f in b.vba_fields})
        if e["status"] == "reversed":
            continue
        for b in BUCKETS:
            amount = Decimal(str(e.get("amounts", {}).get(b.amount, 0)))
            row[b.total] += amount
            row[b.net if e["network"] == "in" else b.oon] += amount
    return totals
