"""The ledger's law (docs/design.md, "The ledger law"), rule by rule, on plain values."""

from __future__ import annotations

from typing import Any

from models.events import ClaimEvent
from models.ledger import ClaimState, Fold, Kind, decide, totals

KEY = ("S1", "G1", "2026", "MED", "DED")
OTHER = ("S1", "G1", "2026", "MED", "OOP")


def event(version: int = 0, eid: str | None = None, **changes: Any) -> ClaimEvent:
    """A claim-c1 event of ``version`` with a copay of 10.00 unless changed."""
    body: dict[str, Any] = {
        "event_id": eid or f"e-v{version}",
        "claim_id": "c1",
        "version": version,
        "status": "adjudicated",
        "subscriber_id": KEY[0],
        "group_id": KEY[1],
        "plan_year": KEY[2],
        "plan_type": KEY[3],
        "benefit_code": KEY[4],
        "network": "in",
        "amounts": {"copay": "10.00"},
    }
    return ClaimEvent.model_validate({**body, **changes})


def fold(*events: ClaimEvent) -> Fold:
    return Fold({}, {}, {}).apply((e, e.content_hash()) for e in events)


def copay(f: Fold, key: tuple[str, ...] = KEY) -> tuple[int, int, int]:
    """(total, in, out) copay cents at ``key`` after the fold."""
    row = totals(f.current.values()).get(key, {})  # type: ignore[arg-type]
    return row.get("copay_total", 0), row.get("copay_in", 0), row.get("copay_out", 0)


def test_first_version_contributes_its_amounts() -> None:
    """A claim's only version adds its amounts to total and its network's column."""
    assert copay(fold(event())) == (1000, 1000, 0)


def test_out_of_network_goes_to_the_oon_column() -> None:
    """An out event adds to total and OON, never to in-network."""
    assert copay(fold(event(network="out"))) == (1000, 0, 1000)


def test_highest_version_wins_in_any_order() -> None:
    """The highest version's amounts replace the lower ones', whichever arrives first."""
    v0, v1 = event(0), event(1, amounts={"copay": "4.00"})
    assert copay(fold(v0, v1)) == copay(fold(v1, v0)) == (400, 400, 0)


def test_reversal_contributes_nothing() -> None:
    """A reversed highest version takes the claim's money out; its own amounts are ignored."""
    reversed_ = event(1, status="reversed", amounts={"copay": "99.00"})
    assert copay(fold(event(0), reversed_)) == (0, 0, 0)


def test_a_higher_version_after_a_reversal_counts_again() -> None:
    """Re-adjudication after a void contributes again."""
    f = fold(event(0), event(1, status="reversed"), event(2, amounts={"copay": "3.00"}))
    assert copay(f) == (300, 300, 0)


def test_key_move_moves_the_money() -> None:
    """A new version on another key takes its money out of the old key and into the new one."""
    f = fold(event(0), event(1, benefit_code="OOP"))
    assert copay(f, KEY) == (0, 0, 0)
    assert copay(f, OTHER) == (1000, 1000, 0)
    assert f.deltas[KEY]["copay_total"] == 0
    assert f.deltas[OTHER]["copay_total"] == 1000


def test_duplicate_event_changes_nothing() -> None:
    """A second delivery of the same event is a counted no-op."""
    f = fold(event(), event())
    assert f.counts[Kind.DUPLICATE] == 1
    assert copay(f) == (1000, 1000, 0)
    assert len(f.received) == 1


def test_same_version_same_content_new_event_id_is_a_duplicate() -> None:
    """The same claim version re-sent under another event_id counts once."""
    f = fold(event(0, "a"), event(0, "b"))
    assert f.counts[Kind.DUPLICATE] == 1
    assert copay(f) == (1000, 1000, 0)


def test_reused_event_id_with_other_content_is_a_conflict() -> None:
    """Same event_id, different content: the first stays, the second is refused with a reason."""
    f = fold(event(0, "a"), event(1, "a", amounts={"copay": "1.00"}))
    assert f.counts[Kind.CONFLICT] == 1
    assert copay(f) == (1000, 1000, 0)
    assert f.conflicts[0][1] == "event_id: already received with different content"


def test_same_version_other_content_is_a_conflict() -> None:
    """Same (claim_id, version) with different content: the first stays, the second is refused."""
    f = fold(event(0, "a"), event(0, "b", amounts={"copay": "1.00"}))
    assert f.counts[Kind.CONFLICT] == 1
    assert copay(f) == (1000, 1000, 0)
    assert f.conflicts[0][1].startswith("claim_id+version: version 0 already received")


def test_lower_version_is_stale() -> None:
    """A version below the claim's highest is counted as stale and changes nothing."""
    f = fold(event(2, amounts={"copay": "2.00"}), event(1))
    assert f.counts[Kind.STALE] == 1
    assert copay(f) == (200, 200, 0)


def test_decide_against_stored_state() -> None:
    """decide() classifies against hashes and state loaded from the store."""
    e = event(1)
    h = e.content_hash()
    current = ClaimState(3, "x", KEY, "in")
    assert decide(e, h, same_event=None, same_version=None, current=current).kind is Kind.STALE
    assert decide(e, h, same_event=h, same_version=None, current=None).kind is Kind.DUPLICATE
    assert decide(e, h, same_event=None, same_version="y", current=None).kind is Kind.CONFLICT
    assert decide(e, h, same_event=None, same_version=None, current=None).kind is Kind.APPLIED
