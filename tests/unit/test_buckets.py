"""The bucket table (docs/design.md, "Buckets") against the seed's field list and its own
invariants."""

from __future__ import annotations

import re
from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st

from models.buckets import (
    AMOUNTS,
    BUCKETS,
    COLUMNS,
    VBA_FIELDS,
    Network,
    fed,
    spread,
    unbalanced,
)
from models.events import Amounts

SEED = Path(__file__).resolve().parents[2].parent / "shared" / "seeds" / "002_ab36b17533dd3d4d.txt"


def seed_not_null_fields() -> set[str]:
    """The amount fields the seed marks NOT NULL (required by the API)."""
    text = SEED.read_text()
    pattern = r"\n(\w+)\nrequired\nnumber <double>\n\n[^\n]*NOT NULL"
    return set(re.findall(pattern, text))


def test_table_matches_the_seed_exactly() -> None:
    """The 30 VBA fields are exactly the seed's NOT NULL amount fields, in VBA's spelling."""
    assert len(VBA_FIELDS) == len(set(VBA_FIELDS)) == 30
    assert set(VBA_FIELDS) == seed_not_null_fields()


def test_amount_names_match_the_event_contract() -> None:
    """The ten amounts of the table are the ten amounts a ClaimEvent carries."""
    assert set(AMOUNTS) == set(Amounts.model_fields)
    assert len(COLUMNS) == len(set(COLUMNS)) == 30


@given(
    st.dictionaries(st.sampled_from(AMOUNTS), st.integers(0, 10**12)),
    st.sampled_from(["in", "out"]),
)
def test_spread_keeps_total_equal_in_plus_out(cents: dict[str, int], network: str) -> None:
    """Any contribution adds to total and exactly one of in/out, so total == in + out holds."""
    values = spread(cents, network)
    assert unbalanced(values) == []
    for b in BUCKETS:
        total, net, oon = b.columns
        assert values[total] == cents.get(b.amount, 0)
        assert values[oon if network == "in" else net] == 0


@given(
    st.dictionaries(st.sampled_from(AMOUNTS), st.integers(-(10**14), 10**14)),
    st.sampled_from(["in", "out"]),
)
def test_the_columns_a_contribution_feeds_are_its_spread_less_the_zeros(
    cents: dict[str, int], network: Network
) -> None:
    """The fold adds ``fed`` (a few columns per event), the oracle ``spread`` (all 30): the two
    agree on every column for any amounts, so the fold's sparse path is the same law."""
    sparse = fed(cents, network)
    assert set(sparse) <= set(COLUMNS)
    assert {c: sparse.get(c, 0) for c in COLUMNS} == spread(cents, network)
