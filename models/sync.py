"""The flush's arithmetic (DESIGN.md section 4), pure: absolute targets from owned shares.

VBA stores absolute totals and its own adjudication writes the same rows, so we never send an
increment. Per key we know ``ours`` (the ledger's sum), ``pushed`` (our share as VBA last
confirmed it) and, in shared ownership, ``remote`` (what VBA holds now). Everything is integer
cents keyed by the 30 store columns of ``models.buckets``.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from decimal import Decimal
from typing import Literal

from models.buckets import COLUMN_TO_VBA, COLUMNS

Cents = dict[str, int]
Ownership = Literal["shared", "exclusive"]
ZERO: Cents = dict.fromkeys(COLUMNS, 0)


def target(
    ours: Mapping[str, int],
    pushed: Mapping[str, int],
    remote: Mapping[str, int] | None,
    ownership: Ownership,
) -> Cents:
    """The absolute values to write so VBA holds ``others + ours``.

    Shared: ``others = remote - pushed`` (VBA's own share; no remote row means none), so VBA's
    amounts are kept and ours counted once. Exclusive: the row is ours alone, ``target = ours``.
    """
    if ownership == "exclusive" or remote is None:
        return {c: ours[c] for c in COLUMNS}
    return {c: remote[c] - pushed[c] + ours[c] for c in COLUMNS}


def landed(remote: Mapping[str, int] | None, intent: Mapping[str, int]) -> bool:
    """Whether a write of unknown outcome took effect: VBA's row equals the recorded target."""
    return remote is not None and all(remote[c] == intent[c] for c in COLUMNS)


def cents_of_vba(amounts: Mapping[str, Decimal]) -> Cents:
    """VBA's 30 amounts (field name -> Decimal) as store columns in cents."""
    vba_to_column = {v: c for c, v in COLUMN_TO_VBA.items()}
    return {vba_to_column[f]: int((a * 100).to_integral_value()) for f, a in amounts.items()}


def vba_of_cents(cents: Mapping[str, int]) -> dict[str, Decimal]:
    """Store columns in cents as VBA's 30 amounts (field name -> Decimal with 2 places)."""
    return {COLUMN_TO_VBA[c]: Decimal(cents[c]).scaleb(-2) for c in COLUMNS}


def backoff(
    attempt: int,
    base: float,
    cap: float,
    rng: random.Random,
    retry_after: float | None = None,
) -> float:
    """Seconds before retry number ``attempt`` (1-based): capped exponential, full jitter.

    A server's Retry-After is a floor (we never come back sooner than asked), still capped.
    """
    ceiling = min(cap, base * 2 ** max(0, attempt - 1))
    delay = rng.uniform(0, ceiling)
    if retry_after is not None:
        delay = max(delay, min(retry_after, cap))
    return delay
