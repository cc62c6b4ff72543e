"""What the VBA client returns: a page of a list, and a 207 batch result matched by key."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from models.events import canon
from models.vba import RemoteAccum
from worker.vba.errors import RETRYABLE


@dataclass(frozen=True, slots=True)
class Page:
    """One page of ``GET .../accumulators`` and its ``X-Pagination`` figures; rows whose money
    could not be read are in ``unreadable`` with the reason (and their key, when readable)."""

    items: list[RemoteAccum]
    page: int
    page_size: int
    total_count: int | None
    total_pages: int | None
    unreadable: list[tuple[tuple[str, ...] | None, str]] = field(default_factory=list)

    @property
    def has_next(self) -> bool:
        """True when a later page exists (or VBA did not say and this page was full)."""
        if self.total_pages is not None:
            return self.page < self.total_pages
        return len(self.items) >= self.page_size


@dataclass(frozen=True, slots=True)
class BatchItem:
    """One 207 item: VBA's key for it, its own status and VBA's message."""

    key: Mapping[str, str]
    status: int
    body: str

    @property
    def ok(self) -> bool:
        """VBA wrote this record (200 Updated, 201 Created)."""
        return 200 <= self.status < 300

    @property
    def retryable(self) -> bool:
        """VBA failed on its side for this record (5xx, 429, 408): send it again later."""
        return self.status in RETRYABLE

    @property
    def rejected(self) -> bool:
        """VBA refused this record: a dead letter with :attr:`body` as the reason."""
        return not self.ok and not self.retryable


class BatchResult:
    """A 207 answer, looked up by key values: ``data[]`` order means nothing."""

    def __init__(
        self,
        items: Iterable[BatchItem],
        key_fields: tuple[str, ...],
        activity_id: str | None,
        path_key: Mapping[str, str] | None = None,
    ) -> None:
        self.items = tuple(items)
        self.key_fields = key_fields
        self.activity_id = activity_id
        #: Key fields the request's path names (subscriber and group): an item's id may leave
        #: them out, naming only the row's own fields.
        self.path_key = {name_key(k): v for k, v in (path_key or {}).items()}
        self._by_key: dict[tuple[str, ...], BatchItem] = {}
        for item in self.items:
            key = self._key_of(item.key)
            seen = self._by_key.get(key)
            if seen is None or (seen.ok and not item.ok):  # a duplicate: keep the worse news
                self._by_key[key] = item

    def _key_of(self, key: Mapping[str, str]) -> tuple[str, ...]:
        """The item's key values in ``key_fields`` order, whatever VBA's spelling of the names
        (``subscriber_ID``, ``subscriberID``, ``SubscriberId``) or the values' case."""
        named = self.path_key | {name_key(name): value for name, value in key.items()}
        return tuple(canon(str(named.get(name_key(f), ""))) for f in self.key_fields)

    def find(self, key: Iterable[str]) -> BatchItem | None:
        """The item for these key values (in ``key_fields`` order), compared as VBA's collation
        compares them; None when VBA sent none."""
        return self._by_key.get(tuple(canon(v) for v in key))

    def missing(self, keys: Iterable[tuple[str, ...]]) -> list[tuple[str, ...]]:
        """The keys we sent that VBA's answer does not mention (outcome unknown)."""
        return [k for k in keys if self.find(k) is None]

    def __len__(self) -> int:
        return len(self.items)

    def __repr__(self) -> str:
        ok = sum(i.ok for i in self.items)
        return f"BatchResult(items={len(self.items)}, ok={ok}, activity_id={self.activity_id!r})"


def name_key(name: str) -> str:
    """A key field's name as compared: case and underscores ignored."""
    return name.casefold().replace("_", "")
