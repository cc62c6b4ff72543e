"""The one table mapping ClaimEvent amounts to VBA SubscriberAccum fields (docs/design.md,
"Buckets").

Each of the ten amounts feeds a trio of VBA fields: the total, the in-network column and the
out-of-network column. An ``in`` event adds to total and in-network, an ``out`` event to total and
out-of-network, so ``total == in + out`` always holds. Nothing else in the code spells these names.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final, Literal

Network = Literal["in", "out"]


@dataclass(frozen=True, slots=True)
class Bucket:
    """One ClaimEvent amount and the three VBA fields it feeds."""

    amount: str
    total: str
    net: str
    oon: str

    @property
    def columns(self) -> tuple[str, str, str]:
        """The store's column names for (total, in-network, out-of-network), in cents."""
        return (f"{self.amount}_total", f"{self.amount}_in", f"{self.amount}_out")

    @property
    def vba_fields(self) -> tuple[str, str, str]:
        """VBA's field names for (total, in-network, out-of-network), VBA's own spelling."""
        return (self.total, self.net, self.oon)


BUCKETS: Final[tuple[Bucket, ...]] = (
    Bucket("allowed", "allowed_Amt", "allowed_Amt_Net", "allowed_Amt_OON"),
    Bucket("benefit_used", "benefit_Used", "benefit_Used_Net", "benefit_Used_OON"),
    Bucket("billed", "billed_Amt", "billed_Amt_Net", "billed_Amt_OON"),
    Bucket("cob", "coB_Amt", "coB_Amt_Net", "coB_Amt_OON"),
    Bucket("coinsurance", "coins_Amt", "coins_Amt_Net", "coins_Amt_OON"),
    Bucket("copay", "copay_Amt", "copay_Amt_Net", "copay_Amt_OON"),
    Bucket("deductible_credit", "ded_Credit_Used", "ded_Credit_PPO_Used", "ded_Credit_OON_Used"),
    Bucket("deductible", "deductible_Used", "ded_PPO_Used", "deductible_Used_OON"),
    Bucket("not_covered", "not_Covered_Amt", "not_Covered_Amt_Net", "not_Covered_OON"),
    Bucket("out_of_pocket", "out_Of_Pocket", "out_Of_Pocket_Net", "out_Of_Pocket_OON"),
)

#: The ten ClaimEvent amount names, in table order.
AMOUNTS: Final[tuple[str, ...]] = tuple(b.amount for b in BUCKETS)

#: The 30 store columns (cents), in table order: total, in, out for each amount.
COLUMNS: Final[tuple[str, ...]] = tuple(c for b in BUCKETS for c in b.columns)

#: The 30 VBA fields, aligned with :data:`COLUMNS`.
VBA_FIELDS: Final[tuple[str, ...]] = tuple(f for b in BUCKETS for f in b.vba_fields)

#: Store column -> VBA field.
COLUMN_TO_VBA: Final[dict[str, str]] = dict(zip(COLUMNS, VBA_FIELDS, strict=True))


def spread(cents_by_amount: dict[str, int], network: Network) -> dict[str, int]:
    """The 30 column deltas (cents) that one contribution of ``network`` adds.

    >>> spread({"copay": 1500}, "in")["copay_in"]
    1500
    """
    out: dict[str, int] = dict.fromkeys(COLUMNS, 0)
    for b in BUCKETS:
        cents = cents_by_amount.get(b.amount, 0)
        total, net, oon = b.columns
        out[total] = cents
        out[net if network == "in" else oon] = cents
    return out


#: (amount, network) -> the two columns a contribution of that network adds to: the total and
#: its network's column.
FED: Final[dict[tuple[str, Network], tuple[str, str]]] = {
    (b.amount, network): (b.columns[0], b.columns[1 if network == "in" else 2])
    for b in BUCKETS
    for network in ("in", "out")
}


def fed(cents_by_amount: dict[str, int], network: Network) -> dict[str, int]:
    """The columns one contribution of ``network`` changes, and by how much (cents): what
    :func:`spread` gives, less the columns it leaves at 0.

    >>> fed({"copay": 1500}, "out")
    {'copay_total': 1500, 'copay_out': 1500}
    """
    out: dict[str, int] = {}
    for amount, cents in cents_by_amount.items():
        total, side = FED[(amount, network)]
        out[total] = cents
        out[side] = cents
    return out


def unbalanced(values: dict[str, int]) -> list[str]:
    """The amounts whose total is not in-network + out-of-network; empty when all hold."""
    return [
        b.amount
        for b in BUCKETS
        if values[b.columns[0]] != values[b.columns[1]] + values[b.columns[2]]
    ]
