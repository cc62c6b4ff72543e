"""The flush's decisions, pure: absolute targets from owned shares, the settle rule, holds,
and a whole protocol run against a simulated VBA, without a database."""

from __future__ import annotations

import random
from decimal import Decimal
from typing import Any

from hypothesis import assume, given
from hypothesis import strategies as st

from models.buckets import COLUMN_TO_VBA, COLUMNS
from models.sync import (
    ZERO,
    Act,
    Cents,
    Decision,
    Fate,
    Intent,
    Item,
    LetterKind,
    Settlement,
    after_send,
    backoff,
    cents_of_vba,
    money,
    plan,
    settle,
    target,
    vba_of_cents,
)

cents = st.fixed_dictionaries({c: st.integers(-(10**9), 10**9) for c in COLUMNS})
amounts = st.integers(0, 10**7)
VBA_TO_COLUMN = {v: c for c, v in COLUMN_TO_VBA.items()}


def balanced(draw: st.DrawFn) -> Cents:
    """A ledger total: non-negative, total == in + out for every bucket."""
    row: Cents = {}
    for i in range(0, len(COLUMNS), 3):
        net, oon = draw(amounts), draw(amounts)
        row |= {COLUMNS[i]: net + oon, COLUMNS[i + 1]: net, COLUMNS[i + 2]: oon}
    return row


totals = st.composite(balanced)()


def plus(a: Cents, b: Cents) -> Cents:
    return {c: a[c] + b[c] for c in COLUMNS}


def one(column: str, value: int) -> Cents:
    return ZERO | {column: value}


@given(others=cents, pushed=cents, ours=cents)
def test_shared_target_keeps_vba_share_and_counts_ours_once(
    others: Cents, pushed: Cents, ours: Cents
) -> None:
    """Whatever we pushed before, VBA ends holding its own share plus ours, exactly once."""
    remote = plus(others, pushed)
    assert target(ours, pushed, remote, "shared") == plus(others, ours)


def test_exclusive_and_absent_rows_send_ours() -> None:
    """Exclusive ownership, or no remote row, sends our totals as they are."""
    ours = dict.fromkeys(COLUMNS, 5)
    remote = dict.fromkeys(COLUMNS, 100)
    assert target(ours, dict.fromkeys(COLUMNS, 1), remote, "exclusive") == ours
    assert target(ours, dict.fromkeys(COLUMNS, 1), None, "shared") == ours


@given(t=cents, before=cents, remote=cents, early=st.booleans())
def test_settle_never_guesses(t: Cents, before: Cents, remote: Cents, early: bool) -> None:
    """Landed only when VBA holds the target; not landed only when it holds what we read
    before, and only once the request can no longer arrive; anything else is ambiguous."""
    verdict = settle(Intent(t, ZERO, 1, before), remote, may_still_land=early)
    if remote == t:
        assert verdict is Settlement.LANDED
    elif early:
        assert verdict is Settlement.TOO_EARLY
    elif remote == before:
        assert verdict is Settlement.NOT_LANDED
    else:
        assert verdict is Settlement.AMBIGUOUS


def test_lost_answer_then_vba_write_is_held_not_resent() -> None:
    """The issue's case: 100 sent and landed, answer lost, VBA adds 50: 150 is neither 100 nor
    0, so the key is held with both candidates (resending would make it 250)."""
    col = "deductible_total"
    sent = Intent(one(col, 10_000), one(col, 10_000), 3, ZERO)
    item = Item(1, ("S", "G", "2026", "MED", "DED"), 3, one(col, 10_000), ZERO, sent)
    decided = plan(item, one(col, 15_000), "shared")
    assert (decided.act, decided.kind) == (Act.HOLD, LetterKind.AMBIGUOUS)
    both = decided.detail["candidates"]["deductible_Used"]
    assert both["if_landed"] == {"our_share": "100.00", "vba_own": "50.00"}
    assert both["if_not_landed"] == {"our_share": "0.00", "vba_own": "150.00"}
    assert decided.keep_intent and decided.target is None
    assert "150" not in decided.reason  # amounts stay out of reasons (they reach terminals)


def test_row_below_our_share_is_held_and_nothing_negative_is_sent() -> None:
    """VBA rebuilt the row below our confirmed share: hold it, never send a negative amount."""
    col = "copay_total"
    item = Item(1, ("S", "G", "2026", "MED", "DED"), 2, ZERO, one(col, 3_000))
    decided = plan(item, one(col, 1_000), "shared")
    assert (decided.act, decided.kind) == (Act.HOLD, LetterKind.BELOW_SHARE)


@given(ours=totals, pushed=totals, remote=totals, shared=st.booleans())
def test_no_plan_ever_sends_a_negative_amount(
    ours: Cents, pushed: Cents, remote: Cents, shared: bool
) -> None:
    """Whatever the store and VBA hold, a SEND's target is never below zero."""
    mode = "shared" if shared else "exclusive"
    decided = plan(Item(1, ("k",), 1, ours, pushed), remote if shared else None, mode)
    if decided.act is Act.SEND:
        assert decided.target is not None
        assert min(decided.target.values()) >= 0


@given(
    rounds=st.lists(
        st.tuples(
            st.one_of(st.none(), totals),  # VBA's own share changes to this (None: unchanged)
            totals,  # the ledger's total for the key
            st.booleans(),  # our write lands
            st.sampled_from(["answered", "item_5xx", "lost"]),
        ),
        min_size=1,
        max_size=8,
    )
)
def test_a_protocol_run_against_a_simulated_vba_counts_every_share_once(
    rounds: list[tuple[Cents | None, Cents, bool, str]],
) -> None:
    """Rounds of (VBA writes its own share, the ledger changes, we flush: the write lands or
    not, its answer arrives, is an item 5xx, or is lost). The key ends held only when VBA wrote
    while a write of ours was unsettled, and then one of the two candidates is the truth;
    otherwise VBA ends holding its own share plus ours, exactly, and pushed is what it holds."""
    vba_own, vba_ours = ZERO, ZERO  # the truth inside VBA
    item = Item(1, ("S", "G", "2026", "MED", "DED"), 0, ZERO, ZERO)
    landed = False  # whether the write of the intent still pending landed
    for n, (own, ledger, lands, how) in enumerate(rounds):
        vba_own = own or vba_own
        # The rule takes VBA's row equal to our target as landed, and equal to the row it was
        # computed from as not landed: a VBA write that makes it so, to the cent on all 30
        # fields, while ours did not land (or while ours landed: VBA took back exactly our
        # change) is the coincidence it can't see.
        pending, holds = item.intent, plus(vba_own, vba_ours)
        assume(pending is None or landed or holds != pending.target)
        assume(pending is None or not landed or holds != pending.before)
        item = Item(1, item.key, n + 1, ledger, item.pushed, item.intent)
        decided = plan(item, holds, "shared")
        if decided.act is Act.HOLD:
            return assert_truth_is_a_candidate(decided.detail, vba_own)
        item = applied(item, decided)
        if decided.act is not Act.SEND:
            continue
        landed = lands = lands or how == "answered"  # a 2xx item means it was written
        if lands:
            vba_ours = {c: decided.target[c] - vba_own[c] for c in COLUMNS}  # type: ignore[index]
        fate = Fate.CONFIRMED if how == "answered" else Fate.UNKNOWN
        reread = plus(vba_own, vba_ours) if how == "item_5xx" else None
        done = after_send(decided, fate, reread, ownership="shared", max_attempts=99)
        assert done.act is not Act.HOLD  # nothing changed between our write and the re-read
        item = applied(item, done)
        if item.intent is None:
            assert item.pushed == vba_ours
    last = Item(1, item.key, 99, item.ours, item.pushed, item.intent)
    decided = plan(last, plus(vba_own, vba_ours), "shared")
    assert decided.act is not Act.HOLD  # VBA's own share did not move after the last write
    item = applied(last, decided)
    if decided.act is Act.SEND:
        vba_ours = {c: decided.target[c] - vba_own[c] for c in COLUMNS}  # type: ignore[index]
        done = after_send(decided, Fate.CONFIRMED, None, ownership="shared", max_attempts=9)
        item = applied(item, done)
    assert item.intent is None and item.pushed == vba_ours == item.ours


def assert_truth_is_a_candidate(detail: dict[str, Any], vba_own: Cents) -> None:
    """An ambiguous hold offers two readings of every differing field; one is VBA's truth."""
    for field_name, both in detail["candidates"].items():
        truth = money(vba_own[VBA_TO_COLUMN[field_name]])
        assert truth in (both["if_landed"]["vba_own"], both["if_not_landed"]["vba_own"])


def applied(item: Item, decided: Decision) -> Item:
    """The store's row after a decision is written (pushed and the intent, as the flush does)."""
    pushed = decided.confirmed[0] if decided.confirmed else item.pushed
    intent = item.intent if decided.keep_intent else None
    if decided.act is Act.SEND:
        intent = decided.sent()
    return Item(item.id, item.key, item.seq, item.ours, pushed, intent)


@given(cents)
def test_cents_and_vba_amounts_round_trip(values: Cents) -> None:
    """Store cents -> VBA Decimals -> store cents is exact."""
    vba = vba_of_cents(values)
    assert all(isinstance(v, Decimal) for v in vba.values())
    assert cents_of_vba(vba) == values


@given(st.integers(1, 60), st.floats(0.01, 10), st.floats(1, 1000), st.integers(0, 2**32))
def test_backoff_is_capped_and_jittered(attempt: int, base: float, cap: float, seed: int) -> None:
    """Full jitter: 0 <= delay <= min(cap, base * 2^(attempt-1))."""
    delay = backoff(attempt, base, cap, random.Random(seed))
    assert 0 <= delay <= min(cap, base * 2 ** (attempt - 1))


@given(st.integers(1, 10**6), st.integers(0, 2**32))
def test_backoff_never_overflows(attempt: int, seed: int) -> None:
    """Five days of failures (attempt 1025 and beyond) still give a delay within the cap;
    before the exponent was capped, ``backoff(1025, ...)`` raised OverflowError."""
    assert 0 <= backoff(attempt, 2, 900, random.Random(seed)) <= 900


@given(st.floats(0, 5000), st.integers(0, 2**32))
def test_retry_after_is_a_capped_floor(retry_after: float, seed: int) -> None:
    """A server's Retry-After is honoured (never sooner), but never beyond the cap."""
    delay = backoff(1, 0.5, 900, random.Random(seed), retry_after)
    assert min(retry_after, 900) <= delay <= 900


KEY = ("S", "G", "2026", "MED", "DED")


def ded(value: int) -> Cents:
    """An in-network deductible: its total and in-network columns."""
    return ZERO | {"deductible_total": value, "deductible_in": value}


def copay(value: int) -> Cents:
    return ZERO | {"copay_total": value, "copay_in": value}


def test_exclusive_waits_while_an_unknown_write_may_land_then_resends_whatever_it_did() -> None:
    """Exclusive ownership reads nothing, so an unknown outcome can't be settled: while its
    request may still land, nothing is sent for the key (a newer total sent now could land
    under it); once it can't, our total is sent again even if the ledger came back to the
    confirmed share, since VBA may hold the unknown write."""
    sent = Intent(ded(10_000), ded(10_000), 3, None)
    fresh = Item(1, KEY, 4, ded(13_000), ZERO, sent, intent_fresh=True)
    assert plan(fresh, None, "exclusive").act is Act.WAIT
    stale = Item(1, KEY, 5, ZERO, ZERO, sent)  # our claims reversed: ours == pushed == 0
    decided = plan(stale, None, "exclusive")
    assert (decided.act, decided.target) == (Act.SEND, ZERO)


def test_an_unknown_outcome_waits_in_either_ownership_until_it_cannot_land() -> None:
    """A lost answer (the request may still land) keeps the intent and waits, exclusive as
    shared; a call VBA answered (an item 500) is over: shared settles it by the row read at
    once, exclusive keeps the intent as done (settled by the next send, at once)."""
    item = Item(1, KEY, 1, ded(10_000), ZERO)
    sending = plan(item, ZERO, "shared")
    for mode in ("shared", "exclusive"):
        waited = after_send(sending, Fate.UNKNOWN, None, ownership=mode, max_attempts=5)  # type: ignore[arg-type]
        assert (waited.act, waited.keep_intent, waited.intent_done) == (Act.WAIT, True, False)
    over = after_send(
        sending, Fate.UNKNOWN, None, ownership="exclusive", max_attempts=5, finished=True
    )
    assert (over.act, over.keep_intent, over.intent_done) == (Act.RETRY, True, True)
    landed = after_send(
        sending, Fate.UNKNOWN, ded(10_000), ownership="shared", max_attempts=5, finished=True
    )
    assert landed.confirmed == (item.ours, item.seq)


def test_a_negative_amount_of_vbas_own_is_refused_with_the_way_out() -> None:
    """VBA's row holds -5.00 copay of its own: we never write a negative and a write carries
    all 30 fields, so the key is refused, saying to correct the field in VBA and replay
    (before, it was held as "below our share" for ever, and resolve changed nothing)."""
    item = Item(1, KEY, 2, ded(10_000), ZERO)
    decided = plan(item, copay(-500), "shared")
    assert (decided.act, decided.kind) == (Act.REFUSE, LetterKind.NEGATIVE)
    assert "copay_Amt" in decided.reason and "replay --id" in decided.reason
    assert decided.detail == {
        "copay_Amt": {"vba_now": "-5.00"},
        "copay_Amt_Net": {"vba_now": "-5.00"},
    }


def test_a_below_share_hold_names_only_the_fields_below_with_both_answers() -> None:
    """One field lowered: the letter names it alone, with what each answer sends."""
    pushed = plus(ded(10_000), copay(3_000))
    item = Item(1, KEY, 2, plus(ded(10_500), copay(3_000)), pushed)
    decided = plan(item, plus(ded(2_000), copay(3_000)), "shared")
    assert (decided.act, decided.kind) == (Act.HOLD, LetterKind.BELOW_SHARE)
    both = {
        "vba_now": "20.00",
        "our_confirmed_share": "100.00",
        "if_not_landed": {"vba_own": "20.00", "we_send": "125.00"},
        "if_landed": {"vba_own": "0.00", "we_send": "105.00"},
    }
    assert decided.detail == {"deductible_Used": both, "ded_PPO_Used": both}
