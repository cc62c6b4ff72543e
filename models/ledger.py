"""The ledger's law (docs/design.md, "The ledger law"), pure: what one event does to a claim
and its totals.

A claim contributes the amounts of its highest version, or nothing when that version is
``reversed``. So totals depend only on the *set* of events received, never on their order or on
how often each was delivered. ``decide`` classifies one event against what is already known;
``Fold`` applies a batch in memory and yields the rows and the per-key deltas to write.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import StrEnum

from models.buckets import COLUMNS, Network, fed, spread
from models.events import AccumKey, ClaimEvent


class Kind(StrEnum):
    """What became of an event: the one vocabulary of ingest outcomes. The batch result, the
    ``ingest_batch`` table's columns, ``status``, metrics and logs all spell them so."""

    RECEIVED = "received"  # every item of a message, whatever became of it
    APPLIED = "applied"
    DUPLICATE = "duplicate"
    STALE = "stale"
    CONFLICT = "conflict"
    INVALID = "invalid"


@dataclass(frozen=True, slots=True)
class ClaimState:
    """A claim's highest version known, and what it contributes (``None``: reversed)."""

    version: int
    content_hash: str
    key: AccumKey | None
    network: Network | None
    cents: tuple[tuple[str, int], ...] = ()

    @classmethod
    def of(cls, event: ClaimEvent, content_hash: str) -> ClaimState:
        """The state an applied event leaves its claim in."""
        if event.status == "reversed":
            return cls(event.version, content_hash, None, None)
        # The amounts set (nonzero) only: most events carry two or three of the ten.
        cents = tuple(sorted((k, int(v * 100)) for k, v in event.amounts.__dict__.items() if v))
        return cls(event.version, content_hash, event.key, event.network, cents)

    def contribution(self) -> dict[str, int]:
        """The 30 column values (cents) this state adds to its key; empty when it adds nothing."""
        if self.key is None or self.network is None:
            return {}
        return spread(dict(self.cents), self.network)

    def changes(self) -> dict[str, int]:
        """The columns this state adds to (its nonzero share of :meth:`contribution`)."""
        if self.key is None or self.network is None:
            return {}
        return fed(dict(self.cents), self.network)


@dataclass(frozen=True, slots=True)
class Outcome:
    """The decision for one event; ``reason`` explains a conflict."""

    kind: Kind
    reason: str = ""


def decide(
    event: ClaimEvent,
    content_hash: str,
    *,
    same_event: str | None,
    same_version: str | None,
    current: ClaimState | None,
) -> Outcome:
    """Classify ``event`` given the content hashes already seen for its event_id and its version.

    ``same_event`` is the hash stored for this event_id, ``same_version`` the hash stored for this
    (claim_id, version) under any event_id, ``current`` the claim's highest version.
    """
    if same_event is not None:
        if same_event == content_hash:
            return Outcome(Kind.DUPLICATE)
        return Outcome(Kind.CONFLICT, "event_id: already received with different content")
    if same_version is not None:
        if same_version == content_hash:
            return Outcome(Kind.DUPLICATE)
        return Outcome(
            Kind.CONFLICT,
            f"claim_id+version: version {event.version} already received with different content",
        )
    if current is not None and event.version < current.version:
        return Outcome(Kind.STALE)
    return Outcome(Kind.APPLIED)


Delta = dict[str, int]


def add_into(target: Delta, values: dict[str, int], sign: int) -> None:
    """``target += sign * values``, column by column."""
    for col, cents in values.items():
        target[col] = target.get(col, 0) + sign * cents


@dataclass
class Fold:
    """Applies a batch of events in memory, starting from what the store already holds.

    After ``apply``: ``received`` holds the (event, hash) pairs to record, ``states`` the claims
    whose highest version changed, ``deltas`` the per-key column changes, ``conflicts`` the events
    refused with their reason, ``counts`` the outcome counts.
    """

    seen_events: dict[str, str]
    seen_versions: dict[tuple[str, int], str]
    current: dict[str, ClaimState]
    received: list[tuple[ClaimEvent, str]] = field(default_factory=list)
    states: dict[str, ClaimState] = field(default_factory=dict)
    deltas: dict[AccumKey, Delta] = field(default_factory=dict)
    conflicts: list[tuple[ClaimEvent, str]] = field(default_factory=list)
    counts: dict[Kind, int] = field(default_factory=lambda: dict.fromkeys(Kind, 0))

    def apply(self, events: Iterable[tuple[ClaimEvent, str]]) -> Fold:
        """Apply each (event, content hash); returns self."""
        for event, content_hash in events:
            self._one(event, content_hash)
        return self

    def _one(self, event: ClaimEvent, content_hash: str) -> None:
        version_key = (event.claim_id, event.version)
        current = self.current.get(event.claim_id)
        outcome = decide(
            event,
            content_hash,
            same_event=self.seen_events.get(event.event_id),
            same_version=self.seen_versions.get(version_key),
            current=current,
        )
        self.counts[outcome.kind] += 1
        if outcome.kind is Kind.CONFLICT:
            self.conflicts.append((event, outcome.reason))
            return
        if event.event_id not in self.seen_events:
            self.seen_events[event.event_id] = content_hash
            self.seen_versions.setdefault(version_key, content_hash)
            self.received.append((event, content_hash))
        if outcome.kind is Kind.APPLIED:
            self._move(event.claim_id, current, ClaimState.of(event, content_hash))

    def _move(self, claim_id: str, old: ClaimState | None, new: ClaimState) -> None:
        """Take ``old``'s money out of its key and put ``new``'s into its (maybe other) key."""
        if old is not None and old.key is not None:
            add_into(self.deltas.setdefault(old.key, {}), old.changes(), -1)
        if new.key is not None:
            add_into(self.deltas.setdefault(new.key, {}), new.changes(), +1)
        self.current[claim_id] = new
        self.states[claim_id] = new

    def nonzero_deltas(self) -> dict[AccumKey, Delta]:
        """Per-key deltas with zero columns dropped and all-zero keys kept (they were touched)."""
        return {k: {c: v for c, v in d.items() if v} for k, d in sorted(self.deltas.items())}


def totals(states: Iterable[ClaimState]) -> dict[AccumKey, dict[str, int]]:
    """The 30 column totals per key implied by a set of claim states (an independent oracle)."""
    out: dict[AccumKey, dict[str, int]] = {}
    for s in states:
        if s.key is not None:
            add_into(out.setdefault(s.key, dict.fromkeys(COLUMNS, 0)), s.contribution(), +1)
    return out
