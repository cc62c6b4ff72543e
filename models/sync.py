"""The flush's decisions (docs/design.md, "The flush"), pure: absolute targets from owned
shares, and the settle rule for writes whose outcome we never heard.

VBA stores absolute totals and its own adjudication writes the same rows, so we never send an
increment. Per key we know ``ours`` (the ledger's sum), ``pushed`` (our share as VBA last
confirmed it) and, in shared ownership, ``remote`` (VBA's row as just read; a row VBA does not
have reads as zeros). Everything is integer cents keyed by the 30 store columns of
``models.buckets``.

A flush asks two questions per key, both answered here without I/O or clock:
- :func:`plan`, before sending: settle any earlier write of unknown outcome, then send a target,
  confirm the key clean, wait, hold it for a person, or refuse it;
- :func:`after_send`, once VBA answered (or did not): confirm, retry, refuse, wait or hold.

The settle rule (:func:`settle`) never guesses: VBA's row equal to the target means our write
landed, equal to the value we computed it from means it did not; anything else means VBA wrote
too, and only a person who reads VBA's claims can tell which total is right.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from decimal import Decimal
from enum import StrEnum
from typing import Any, Literal

from models.buckets import COLUMN_TO_VBA, COLUMNS, unbalanced

Cents = dict[str, int]
Ownership = Literal["shared", "exclusive"]
ZERO: Cents = dict.fromkeys(COLUMNS, 0)
MAX_EXPONENT = 30
"""Backoff doubles at most this often: 2**1024 overflows a float (about five days of failures)."""


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


def same(a: Mapping[str, int], b: Mapping[str, int]) -> bool:
    """Equal on all 30 columns."""
    return all(a[c] == b[c] for c in COLUMNS)


def minus(a: Mapping[str, int], b: Mapping[str, int]) -> Cents:
    return {c: a[c] - b[c] for c in COLUMNS}


class Settlement(StrEnum):
    """What became of a write whose answer we never read."""

    LANDED = "landed"
    NOT_LANDED = "not_landed"
    TOO_EARLY = "too_early"  # not there (yet): the request may still be on its way
    AMBIGUOUS = "ambiguous"  # VBA wrote too: a person must tell


@dataclass(frozen=True, slots=True)
class Intent:
    """A write recorded before it left: what we asked VBA to hold, and from what."""

    target: Cents
    ours: Cents
    seq: int
    before: Cents | None
    """VBA's row the target was computed from (shared); None when nothing was read."""


def settle(intent: Intent, remote: Mapping[str, int], *, may_still_land: bool) -> Settlement:
    """The settle rule: ``remote == target`` landed; ``remote == before`` not landed (once the
    request can no longer arrive); anything else is ambiguous. Never a guess."""
    if same(remote, intent.target):
        return Settlement.LANDED
    if may_still_land:
        return Settlement.TOO_EARLY
    if intent.before is not None and same(remote, intent.before):
        return Settlement.NOT_LANDED
    return Settlement.AMBIGUOUS


@dataclass(frozen=True, slots=True)
class Item:
    """One accumulator as a flush loaded it (its row in the store)."""

    id: int
    key: tuple[str, ...]
    seq: int
    ours: Cents
    pushed: Cents
    intent: Intent | None = None
    attempts: int = 0
    intent_fresh: bool = False
    """The intent's request may still reach VBA (recorded less than the settle grace ago)."""


class Act(StrEnum):
    """What a flush does with one key."""

    SEND = "send"  # record the intent, then write the target
    CONFIRM = "confirm"  # VBA holds our share as of ``confirmed``: record it
    WAIT = "wait"  # a write of ours may still land: look again later, intent kept
    RETRY = "retry"  # not written: send again after a backoff
    HOLD = "hold"  # a person must settle it (a dead letter; health turns red)
    REFUSE = "refuse"  # cannot or must not be sent as it is (a dead letter)


class LetterKind(StrEnum):
    """Why a key is held or refused: the dead letter's ``kind``."""

    AMBIGUOUS = "ambiguous"
    BELOW_SHARE = "below_share"
    REFUSED = "refused"
    INVARIANT = "invariant"
    NEGATIVE = "negative"
    GAVE_UP = "gave_up"
    UNSENDABLE = "unsendable"
    UNREADABLE = "unreadable"


HOLDS = frozenset({LetterKind.AMBIGUOUS, LetterKind.BELOW_SHARE})
"""Kinds that wait for an operator's ``dead-letters resolve`` (and turn health red)."""


@dataclass(frozen=True, slots=True)
class Decision:
    """The decision for one key. ``confirmed`` (our share VBA holds, with its change_seq) is set
    whenever the decision learned it, also under a hold or a refusal: it must be recorded."""

    item: Item
    act: Act
    confirmed: tuple[Cents, int] | None = None
    target: Cents | None = None
    before: Cents | None = None
    kind: LetterKind | None = None
    reason: str = ""
    detail: dict[str, Any] = field(default_factory=dict)
    keep_intent: bool = False
    intent_done: bool = False
    """With ``keep_intent``: no request of the intent can still land (VBA answered it), so the
    next flush settles it at once instead of after the grace."""
    activity_id: str | None = None
    """VBA's activityId of the answer this decision came from (VBA support asks for it)."""
    counted: bool = True
    """A RETRY that spends one of the key's attempts (a whole-call outage backs the pair off
    instead, and spends none)."""

    @property
    def pushed(self) -> Cents:
        """Our confirmed share after this decision."""
        return self.confirmed[0] if self.confirmed else self.item.pushed

    def sent(self) -> Intent:
        """The intent of a SEND (what the flush records before the request leaves)."""
        assert self.target is not None
        return Intent(self.target, self.item.ours, self.item.seq, self.before)


def plan(item: Item, remote: Mapping[str, int] | None, ownership: Ownership) -> Decision:
    """What to do with ``item`` now; ``remote`` is VBA's row (zeros if absent), None unread."""
    confirmed: tuple[Cents, int] | None = None
    unsettled = False  # a write of ours VBA may hold, though nothing was read to tell
    if item.intent is not None and remote is None:
        if item.intent_fresh:  # exclusive: the old request may still land over a new one
            return Decision(item, Act.WAIT, keep_intent=True)
        unsettled = True  # it can no longer land: an absolute resend overwrites whatever it did
    elif item.intent is not None and remote is not None:
        verdict = settle(item.intent, remote, may_still_land=item.intent_fresh)
        if verdict is Settlement.TOO_EARLY:
            return Decision(item, Act.WAIT, keep_intent=True)
        if verdict is Settlement.AMBIGUOUS:
            return ambiguous(item, item.intent, remote, item.pushed)
        if verdict is Settlement.LANDED:
            confirmed = (item.intent.ours, item.intent.seq)
    base = Decision(item, Act.CONFIRM, confirmed)
    if broken := unbalanced(item.ours):
        why = f"ledger invariant: total != in + out for {', '.join(broken)}"
        refused = replace(base, act=Act.REFUSE, kind=LetterKind.INVARIANT, reason=why)
        return replace(refused, keep_intent=unsettled, intent_done=unsettled)
    if same(item.ours, base.pushed) and not unsettled:
        return replace(base, confirmed=(item.ours, item.seq))
    if ownership == "shared" and remote is not None:
        if negative := [c for c in COLUMNS if remote[c] < 0]:
            return negative_row(base, remote, negative)
        share = minus(remote, base.pushed)
        if below := [c for c in COLUMNS if share[c] < 0]:
            return below_share(base, remote, below)
    goal = target(item.ours, base.pushed, remote, ownership)
    if negative := [COLUMN_TO_VBA[c] for c in COLUMNS if goal[c] < 0]:
        why = f"never sent: negative amounts for {', '.join(negative)}"
        return replace(base, act=Act.REFUSE, kind=LetterKind.NEGATIVE, reason=why)
    before = dict(remote) if ownership == "shared" and remote is not None else None
    return replace(base, act=Act.SEND, target=goal, before=before)


class Fate(StrEnum):
    """What VBA's answer says about one record we sent."""

    CONFIRMED = "confirmed"  # a 2xx item
    REFUSED = "refused"  # a 4xx item, or a whole-call refusal: nothing written
    NOT_SENT = "not_sent"  # the request never reached VBA's handler
    UNKNOWN = "unknown"  # an item 5xx, no item for it, or no answer at all


def after_send(
    sent: Decision,
    fate: Fate,
    remote: Mapping[str, int] | None,
    *,
    ownership: Ownership,
    max_attempts: int,
    reason: str = "",
    counted: bool = True,
    finished: bool = False,
) -> Decision:
    """What a SEND became. ``remote`` is VBA's row read after the answer (shared, when VBA was
    done with the request: ``finished``); None when not read. A write of unknown outcome whose
    request may still land waits (its intent kept) until the grace has passed, in either
    ownership: sent again sooner, an older total could land over the newer one. ``counted`` is
    False for a whole-call failure: the pair backs off, and the key spends none of its
    attempts."""
    item, intent = sent.item, sent.sent()
    done = Decision(item, Act.CONFIRM, sent.confirmed)
    if fate is Fate.CONFIRMED:
        return replace(done, confirmed=(item.ours, item.seq))
    if fate is Fate.REFUSED:
        return replace(done, act=Act.REFUSE, kind=LetterKind.REFUSED, reason=reason)
    unsettled = fate is Fate.UNKNOWN
    if unsettled and remote is not None:
        verdict = settle(intent, remote, may_still_land=False)
        if verdict is Settlement.LANDED:
            return replace(done, confirmed=(item.ours, item.seq))
        if verdict is Settlement.AMBIGUOUS:
            return ambiguous(item, intent, remote, sent.pushed)
        unsettled = False  # not landed: nothing of it can land any more
    elif unsettled and not finished:
        return replace(done, act=Act.WAIT, keep_intent=True, reason=reason)
    # Not written, or (VBA done, its row unread) written or not: again later, and an unsettled
    # intent stays to be settled (shared) or overwritten (exclusive) by the next flush.
    retry = replace(
        done, act=Act.RETRY, reason=reason, keep_intent=unsettled, intent_done=unsettled
    )
    if not counted:
        return replace(retry, counted=False)
    if item.attempts + 1 >= max_attempts:
        why = f"gave up after {item.attempts + 1} attempts: {reason}"
        return replace(retry, act=Act.REFUSE, kind=LetterKind.GAVE_UP, reason=why)
    return retry


def ambiguous(
    item: Item, intent: Intent, remote: Mapping[str, int], pushed: Mapping[str, int]
) -> Decision:
    """Hold a key whose write of unknown outcome VBA's own write has since hidden."""
    fields = [c for c in COLUMNS if remote[c] != intent.target[c]]
    candidates = {
        COLUMN_TO_VBA[c]: {
            "vba_now": money(remote[c]),
            "we_sent": money(intent.target[c]),
            "we_read_before": None if intent.before is None else money(intent.before[c]),
            "if_landed": split(remote[c], intent.ours[c]),
            "if_not_landed": split(remote[c], pushed[c]),
        }
        for c in fields
    }
    why = (
        f"ambiguous outcome: VBA changed the row after a write of ours whose answer was lost "
        f"({len(fields)} fields match neither the value sent nor the value read before); the "
        "candidate totals are in the payload. Check VBA's claims, then `accumsync dead-letters "
        "resolve ID --landed` or `--not-landed`"
    )
    return Decision(
        item,
        Act.HOLD,
        kind=LetterKind.AMBIGUOUS,
        reason=why,
        detail={"candidates": candidates},
        keep_intent=True,
    )


def split(remote: int, ours: int) -> dict[str, str]:
    """VBA's row as our share and VBA's own, if our share is ``ours``."""
    return {"our_share": money(ours), "vba_own": money(remote - ours)}


def below_share(base: Decision, remote: Mapping[str, int], below: list[str]) -> Decision:
    """Hold a key whose VBA row holds less than our confirmed share in some fields."""
    why, detail = below_share_letter(remote, base.pushed, base.item.ours, below)
    return replace(base, act=Act.HOLD, kind=LetterKind.BELOW_SHARE, reason=why, detail=detail)


def below_share_letter(
    remote: Mapping[str, int], pushed: Mapping[str, int], ours: Mapping[str, int], below: list[str]
) -> tuple[str, dict[str, Any]]:
    """The reason and payload of a below-share hold (VBA reset or rebuilt some fields). Only
    those fields are in question; where VBA's value is above zero, the row cannot tell which
    share survived, so a person decides, and the letter says what each answer sends."""
    detail = {
        COLUMN_TO_VBA[c]: {
            "vba_now": money(remote[c]),
            "our_confirmed_share": money(pushed[c]),
            "if_not_landed": {"vba_own": money(remote[c]), "we_send": money(remote[c] + ours[c])},
            "if_landed": {"vba_own": money(0), "we_send": money(ours[c])},
        }
        for c in below
    }
    names = ", ".join(COLUMN_TO_VBA[c] for c in below)
    why = (
        f"VBA's row is below our confirmed share in {len(below)} of its 30 fields ({names}): "
        "reset or rebuilt in VBA? Nothing is sent for the key. Check VBA's claims, then say what "
        "those fields hold: `accumsync dead-letters resolve ID --not-landed` (our share is gone "
        "from them; what VBA shows is its own, and we add ours to it) or `--landed` (what VBA "
        "shows there is what is left of ours; we send our total). The other fields keep our "
        "confirmed share either way"
    )
    return why, detail


def negative_row(base: Decision, remote: Mapping[str, int], negative: list[str]) -> Decision:
    """Refuse a key whose VBA row holds a negative amount of VBA's own: we never write one,
    and every write carries all 30 fields, so the row must be corrected in VBA first."""
    names = ", ".join(COLUMN_TO_VBA[c] for c in negative)
    detail = {COLUMN_TO_VBA[c]: {"vba_now": money(remote[c])} for c in negative}
    why = (
        f"VBA's row holds a negative amount in {names}; accumsync never writes a negative amount "
        "and a write carries all 30 fields, so it cannot write this row. Correct the field in "
        "VBA, then `accumsync dead-letters replay --id ID` (the key is read again and sent)"
    )
    return replace(base, act=Act.REFUSE, kind=LetterKind.NEGATIVE, reason=why, detail=detail)


def money(cents: int) -> str:
    """Cents as a 2-decimal string (dead-letter payloads)."""
    return f"{Decimal(cents).scaleb(-2):.2f}"


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
    ceiling = min(cap, base * 2 ** min(max(0, attempt - 1), MAX_EXPONENT))
    delay = rng.uniform(0, ceiling)
    if retry_after is not None:
        delay = max(delay, min(retry_after, cap))
    return delay
