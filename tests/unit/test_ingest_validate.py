"""The batch's validation: one call for a whole batch, item by item once an item is invalid.
Either way every item gets what it would get alone."""

from __future__ import annotations

from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from tests.unit.test_events import BASE
from worker.ingest.store import validate

INVALID: list[Any] = [
    {**BASE, "version": -1},
    {**BASE, "amounts": {"copay": "1.005"}},
    {**BASE, "subscriber_id": "CAFÉ"},
    {**BASE, "surprise": 1},
    "not an object",
    '{"half": ',
    None,
]


def item(i: int, bad: int | None) -> Any:
    return INVALID[bad] if bad is not None else {**BASE, "event_id": f"e-{i}", "claim_id": f"c{i}"}


@given(st.lists(st.one_of(st.none(), st.integers(0, len(INVALID) - 1)), max_size=30))
def test_a_batch_validates_as_its_items_alone(plan: list[int | None]) -> None:
    batch = [item(i, bad) for i, bad in enumerate(plan)]
    good, bad = validate(batch)
    alone = [validate([x]) for x in batch]
    assert [(e.event_id, h) for e, h, _ in good] == [
        (e.event_id, h) for g, _ in alone for e, h, _ in g
    ]
    assert [id(raw) for _, _, raw in good] == [id(raw) for g, _ in alone for _, _, raw in g]
    assert bad == [r for _, b in alone for r in b]
    assert len(good) + len(bad) == len(batch)
