"""VBA's own writes injected at the worst moment: right after a list or a batch of one pair."""

from __future__ import annotations

from decimal import Decimal
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from models.buckets import VBA_FIELDS
from models.vba import Money, SubscriberAccum
from worker.sandbox.dialect import Fold, Key, exact

After = Literal["list", "batch"]
_ROW = SubscriberAccum.model_fields  # the key fields' rules (lengths) are the row's own


class IntrusionKey(BaseModel):
    """One row of the pair an intrusion adds to (the pair itself is the intrusion's)."""

    model_config = ConfigDict(extra="forbid")

    plan_Year: Annotated[str, _ROW["plan_Year"]]
    plan_Type: Annotated[str, _ROW["plan_Type"]]
    benefit_Code: Annotated[str, _ROW["benefit_Code"]]


class Intrusion(BaseModel):
    """``POST /_admin/intrude``: after a matching call is answered, VBA adds ``deltas``.

    A matching call is a list (``after="list"``) or a subscriber batch PUT (``"batch"``) of
    the pair. The first ``skip`` matching calls pass; the next ``times`` set it off. Without
    ``keys`` it adds to every row the call returned or wrote.
    """

    model_config = ConfigDict(extra="forbid")

    after: After
    subscriber_ID: Annotated[str, _ROW["subscriber_ID"]]
    group_ID: Annotated[str, _ROW["group_ID"]]
    keys: list[IntrusionKey] | None = None
    deltas: dict[str, Money]
    times: int = Field(default=1, ge=1)
    skip: int = Field(default=0, ge=0)

    @field_validator("deltas")
    @classmethod
    def _known_amounts(cls, deltas: dict[str, Decimal]) -> dict[str, Decimal]:
        unknown = set(deltas) - set(VBA_FIELDS)
        if unknown:
            raise ValueError(f"unknown amount fields: {sorted(unknown)}")
        return deltas

    @property
    def pair(self) -> Key:
        """The (subscriber, group) whose calls set it off."""
        return (self.subscriber_ID, self.group_ID)

    def rows(self, touched: list[Key]) -> list[Key]:
        """The row keys it adds to: its own ``keys``, or those the call ``touched``."""
        if self.keys is None:
            return touched
        return [(*self.pair, k.plan_Year, k.plan_Type, k.benefit_Code) for k in self.keys]


class Intrusions:
    """Pending intrusions by id; in memory only (a reset or a restart forgets them).

    ``fold`` is how a call's pair compares with an intrusion's (see State).
    """

    def __init__(self, fold: Fold = exact) -> None:
        self.fold = fold
        self.pending: dict[int, Intrusion] = {}
        self.last_id = 0

    def add(self, intrusion: Intrusion) -> dict[str, Any]:
        """Queue one; returns it as listed."""
        self.last_id += 1
        self.pending[self.last_id] = intrusion
        return self.listed(self.last_id)

    def listed(self, ident: int) -> dict[str, Any]:
        """One pending intrusion with its id, ``skip`` and ``times`` as they remain."""
        return {"id": ident} | self.pending[ident].model_dump(mode="python")

    def due(self, after: After, pair: tuple[str, str]) -> list[Intrusion]:
        """The intrusions this call sets off; each matching call spends a skip, else a time."""
        fired = []
        for ident, intrusion in list(self.pending.items()):
            if intrusion.after != after or self.fold(intrusion.pair) != self.fold(pair):
                continue
            if intrusion.skip > 0:
                intrusion.skip -= 1
                continue
            intrusion.times -= 1
            if intrusion.times == 0:
                del self.pending[ident]
            fired.append(intrusion)
        return fired

    def clear(self) -> None:
        """Forget every pending intrusion."""
        self.pending.clear()
