"""The flush's arithmetic: absolute targets from owned shares, landed checks, backoff bounds."""

from __future__ import annotations

import random
from decimal import Decimal

from hypothesis import given
from hypothesis import strategies as st

from models.buckets import COLUMNS
from models.sync import backoff, cents_of_vba, landed, target, vba_of_cents

cents = st.fixed_dictionaries({c: st.integers(-(10**9), 10**9) for c in COLUMNS})


@given(others=cents, pushed=cents, ours=cents)
def test_shared_target_keeps_vba_share_and_counts_ours_once(
    others: dict[str, int], pushed: dict[str, int], ours: dict[str, int]
) -> None:
    """Whatever we pushed before, VBA ends holding its own share plus ours, exactly once."""
    remote = {c: others[c] + pushed[c] for c in COLUMNS}
    assert target(ours, pushed, remote, "shared") == {c: others[c] + ours[c] for c in COLUMNS}


@given(pushed=cents, ours=cents)
def test_repeating_a_confirmed_flush_changes_nothing(
    pushed: dict[str, int], ours: dict[str, int]
) -> None:
    """After VBA confirmed target T (pushed = ours), the next target is T again: idempotent."""
    remote = target(ours, pushed, dict.fromkeys(COLUMNS, 0), "shared")
    assert target(ours, ours, remote, "shared") == remote


def test_exclusive_and_absent_rows_send_ours() -> None:
    """Exclusive ownership, or no remote row, sends our totals as they are."""
    ours = dict.fromkeys(COLUMNS, 5)
    remote = dict.fromkeys(COLUMNS, 100)
    assert target(ours, dict.fromkeys(COLUMNS, 1), remote, "exclusive") == ours
    assert target(ours, dict.fromkeys(COLUMNS, 1), None, "shared") == ours


def test_landed_only_on_exact_equality() -> None:
    """An unknown outcome counts as landed only when VBA's row equals the recorded target."""
    intent = dict.fromkeys(COLUMNS, 7)
    assert landed(dict(intent), intent)
    assert not landed(intent | {"copay_total": 8}, intent)
    assert not landed(None, intent)


@given(cents)
def test_cents_and_vba_amounts_round_trip(values: dict[str, int]) -> None:
    """Store cents -> VBA Decimals -> store cents is exact."""
    vba = vba_of_cents(values)
    assert all(isinstance(v, Decimal) for v in vba.values())
    assert cents_of_vba(vba) == values


@given(st.integers(1, 60), st.floats(0.01, 10), st.floats(1, 1000), st.integers(0, 2**32))
def test_backoff_is_capped_and_jittered(attempt: int, base: float, cap: float, seed: int) -> None:
    """Full jitter: 0 <= delay <= min(cap, base * 2^(attempt-1))."""
    delay = backoff(attempt, base, cap, random.Random(seed))
    assert 0 <= delay <= min(cap, base * 2 ** (attempt - 1))


@given(st.floats(0, 5000), st.integers(0, 2**32))
def test_retry_after_is_a_capped_floor(retry_after: float, seed: int) -> None:
    """A server's Retry-After is honoured (never sooner), but never beyond the cap."""
    delay = backoff(1, 0.5, 900, random.Random(seed), retry_after)
    assert min(retry_after, 900) <= delay <= 900
