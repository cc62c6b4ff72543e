"""A shared-mode flush takes its read's and its PUT's rate-limit tokens together, so the PUT
does not queue behind other processes' calls between its read and its write."""

from __future__ import annotations

import json

import httpx
import pytest

from tests.unit.vba_fake import FakeVba, record, vba_json
from worker.vba import VbaUnavailable
from worker.vba.ratelimit import LocalBucket


class LoggedBucket(LocalBucket):
    """One bucket shared by several clients (as Redis shares it), logging who took a token."""

    def __init__(self) -> None:
        super().__init__(rate=1000.0, burst=1000)
        self.log: list[str] = []
        self.who = ""

    def reserve(self) -> float:
        self.log.append(self.who)
        return super().reserve()


def listing() -> httpx.Response:
    info = {"TotalCount": 0, "TotalPages": 1, "CurrentPage": 1, "PageSize": 100}
    return vba_json([], headers={"X-Pagination": json.dumps(info)})


def item(code: str) -> dict[str, object]:
    keys = {"subscriber_ID": "123456789", "group_ID": "GRP1", "plan_Year": "2026"}
    keys |= {"plan_Type": "MED", "benefit_Code": code}
    return {"id": [{"key": k, "value": v} for k, v in keys.items()], "status": 200}


def test_the_puts_token_is_taken_with_the_reads() -> None:
    """Another process's calls between our read and our PUT take later tokens than our PUT."""
    bucket = LoggedBucket()
    ours = FakeVba(listing(), vba_json([item("DED")], status=207)).client()
    theirs = FakeVba(*[listing() for _ in range(3)]).client()
    ours.limiter = theirs.limiter = bucket
    ours.auth.limiter = theirs.auth.limiter = bucket
    ours.auth.token(), theirs.auth.token()  # logins first: not part of the story
    bucket.log.clear()
    bucket.who = "ours"
    ours.prepay(2)
    list(ours.iter_accumulators("123456789", "GRP1"))
    bucket.who = "theirs"
    for _ in range(3):
        list(theirs.iter_accumulators("123456789", "GRP1"))
    bucket.who = "ours"
    ours.upsert_accumulators("123456789", "GRP1", [record("DED")])
    assert bucket.log == ["ours", "ours", "theirs", "theirs", "theirs"]


def test_a_new_prepay_drops_tokens_left_unspent() -> None:
    """A flush that read but had nothing to send leaves a token; the next one does not spend
    it late (which could exceed the rate), it takes its own."""
    bucket = LoggedBucket()
    client = FakeVba(listing(), listing()).client()
    client.limiter = client.auth.limiter = bucket
    client.auth.token()
    bucket.log.clear()
    client.prepay(2)
    list(client.iter_accumulators("123456789", "GRP1"))  # no PUT follows
    client.prepay(2)
    list(client.iter_accumulators("123456789", "GRP1"))
    assert len(bucket.log) == 4  # each flush took its own two: none was spent late


def test_a_paused_fleet_takes_no_token() -> None:
    """While the breaker pauses every call, a flush's read takes no token, nor its PUT's: the
    bucket is not drained into the future by calls that never leave."""
    bucket = LoggedBucket()
    client = FakeVba().client()
    client.limiter = client.auth.limiter = bucket
    client.breaker.failed(retry_after=60)
    client.prepay(2)
    with pytest.raises(VbaUnavailable):
        list(client.iter_accumulators("123456789", "GRP1"))
    assert bucket.log == []
