"""The pure part of receipts: which lines of a stream carry an id a receipt can be asked for."""

from __future__ import annotations

from worker.ingest.receipts import Receipts, event_ids


def test_ids_keep_the_stream_order_once_each_and_lines_without_one_are_named() -> None:
    stream = [
        {"event_id": "b"},
        {"event_id": "a"},
        {"event_id": "b"},  # a duplicate line: one receipt
        {"event_id": ""},
        {"event_id": 7},
        "not json",
        {"claim_id": "c"},
    ]
    assert event_ids(stream) == (["b", "a"], [4, 5, 6, 7])


def test_complete_only_when_everything_is_recorded() -> None:
    assert Receipts(recorded=["a"]).complete
    assert not Receipts(recorded=["a"], refused=["b"]).complete
    assert not Receipts(missing=["c"]).complete
    assert not Receipts(recorded=["a"], unidentified=[2]).complete
    assert Receipts(recorded=["a"], missing=["c"]).as_json()["counts"] == {
        "recorded": 1,
        "refused": 0,
        "missing": 1,
        "unidentified": 0,
    }
