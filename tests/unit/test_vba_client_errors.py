"""The VBA client's classification of failures, Retry-After, auth renewal and headers."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import httpx
import pytest

from tests.unit.vba_fake import API_KEY, FakeVba, problem, vba_json
from worker.vba import USER_AGENT, VbaAuthError, VbaRejected, VbaUnavailable
from worker.vba.errors import RETRY_AFTER_CAP, parse_retry_after

NOW = datetime(2026, 1, 5, 12, 0, tzinfo=UTC)


def test_retry_after_seconds() -> None:
    """Retry-After in delta-seconds is taken as is."""
    assert parse_retry_after("7") == 7.0


def test_retry_after_http_date() -> None:
    """Retry-After as an HTTP date is the time left until then."""
    assert parse_retry_after(format_datetime(NOW + timedelta(seconds=30), usegmt=True), NOW) == 30.0


def test_retry_after_past_date_is_zero() -> None:
    """An HTTP date already past means retry now."""
    assert parse_retry_after(format_datetime(NOW - timedelta(hours=1), usegmt=True), NOW) == 0.0


def test_retry_after_is_capped() -> None:
    """A huge Retry-After is capped."""
    assert parse_retry_after("999999") == RETRY_AFTER_CAP


@pytest.mark.parametrize("value", [None, "", "soon", "nan"])
def test_retry_after_garbage_is_none(value: str | None) -> None:
    """An absent or unreadable Retry-After gives None."""
    assert parse_retry_after(value) is None


@pytest.mark.parametrize("status", [408, 429, 500, 502, 503, 504])
def test_retryable_statuses_raise_unavailable(status: int) -> None:
    """408, 429 and 5xx raise VbaUnavailable carrying status, Retry-After and activityId."""
    fake = FakeVba(problem(status, headers={"Retry-After": "3"}))
    with pytest.raises(VbaUnavailable) as caught, fake.client() as client:
        client.get_accumulator("1", "G", "2026", "MED", "DED")
    assert (caught.value.status, caught.value.retry_after) == (status, 3.0)
    assert caught.value.activity_id == f"act-{status}"


@pytest.mark.parametrize("status", [500, 502, 503, 504])
def test_a_gateways_5xx_may_still_land(status: int) -> None:
    """A 5xx without VBA's envelope came from something in front of VBA (an IIS 502.3, an
    application gateway, a load balancer's idle timeout): VBA's handler may be working on the
    request still, so a write's outcome stays unknown until the grace has passed."""
    fake = FakeVba(httpx.Response(status, json={"message": "Internal server error"}))
    with pytest.raises(VbaUnavailable) as caught, fake.client() as client:
        client.get_accumulator("1", "G", "2026", "MED", "DED")
    assert caught.value.may_have_landed and caught.value.may_still_land
    assert "gateway" in str(caught.value)


@pytest.mark.parametrize(
    ("status", "landed", "still"),
    [(500, True, False), (502, True, False), (504, True, False), (503, False, False)],
)
def test_vbas_own_5xx_says_the_request_is_over(status: int, landed: bool, still: bool) -> None:
    """A 5xx in VBA's envelope (its activity id) was written by VBA's side once it was done
    with the request: its rows tell at once what happened. Its own 503 refused the request
    before the handler: nothing was written."""
    fake = FakeVba(problem(status))
    with pytest.raises(VbaUnavailable) as caught, fake.client() as client:
        client.get_accumulator("1", "G", "2026", "MED", "DED")
    assert (caught.value.may_have_landed, caught.value.may_still_land) == (landed, still)


@pytest.mark.parametrize("status", [408, 429])
def test_refusals_before_processing_never_landed(status: int) -> None:
    """A 408 (the request never arrived whole) or a 429 (the gateway's rate limit) proves
    nothing was written, whoever answered."""
    for answer in (problem(status), httpx.Response(status, json={"message": "Too Many"})):
        fake = FakeVba(answer)
        with pytest.raises(VbaUnavailable) as caught, fake.client() as client:
            client.get_accumulator("1", "G", "2026", "MED", "DED")
        assert not caught.value.may_have_landed and not caught.value.may_still_land


@pytest.mark.parametrize("status", [400, 404, 409, 422])
def test_other_statuses_raise_rejected(status: int) -> None:
    """Other non-2xx raise VbaRejected with VBA's title, detail and activityId."""
    fake = FakeVba(problem(status, title="Invalid", detail="plan_Year: too long"))
    with pytest.raises(VbaRejected) as caught, fake.client() as client:
        client.get_accumulator("1", "G", "2026", "MED", "DED")
    err = caught.value
    assert (err.status, err.title, err.detail, err.activity_id) == (
        status,
        "Invalid",
        "plan_Year: too long",
        f"act-{status}",
    )
    assert not isinstance(err, VbaAuthError)


def test_gateway_403_is_rejected_with_its_message() -> None:
    """API Gateway's plain {"message": "Forbidden"} becomes VbaRejected(403, "Forbidden")."""
    fake = FakeVba(httpx.Response(403, json={"message": "Forbidden"}))
    with pytest.raises(VbaRejected) as caught, fake.client() as client:
        client.delete_accumulator("1", "G", "2026", "MED", "DED")
    assert (caught.value.status, caught.value.title) == (403, "Forbidden")


def test_connect_error_is_retried_once() -> None:
    """A refused connection is retried once, quickly, by the client itself."""
    fake = FakeVba(httpx.ConnectError("refused"), vba_json(None, 204))
    with fake.client() as client:
        client.delete_accumulator("1", "G", "2026", "MED", "DED")
    assert len(fake.calls) == 2


def test_second_connect_error_raises_unavailable() -> None:
    """Two refused connections in a row raise VbaUnavailable."""
    fake = FakeVba(httpx.ConnectError("refused"), httpx.ConnectError("refused"))
    with pytest.raises(VbaUnavailable), fake.client() as client:
        client.delete_accumulator("1", "G", "2026", "MED", "DED")
    assert len(fake.calls) == 2


def test_timeout_raises_unavailable_without_retry() -> None:
    """A read timeout is not retried by the client: the caller schedules the retry."""
    fake = FakeVba(httpx.ReadTimeout("slow"))
    with pytest.raises(VbaUnavailable) as caught, fake.client() as client:
        client.delete_accumulator("1", "G", "2026", "MED", "DED")
    assert len(fake.calls) == 1
    assert caught.value.retry_after is None


def test_401_refreshes_the_token_once_and_retries() -> None:
    """A 401 renews the token and repeats the call with the new token."""
    fake = FakeVba(problem(401), vba_json(None, 204))
    with fake.client() as client:
        client.delete_accumulator("1", "G", "2026", "MED", "DED")
    assert [r.headers["Authorization"] for r in fake.calls] == ["Bearer tok1", "Bearer tok2"]
    assert fake.requests[2].url.path.endswith("/user-refresh-tokens")
    assert fake.requests[2].headers["expired-id-token"] == "tok1"


def test_401_after_refresh_raises_auth_error() -> None:
    """A second 401 after the refresh fails loudly with VbaAuthError."""
    fake = FakeVba(problem(401), problem(401))
    with pytest.raises(VbaAuthError) as caught, fake.client() as client:
        client.delete_accumulator("1", "G", "2026", "MED", "DED")
    assert caught.value.status == 401


def test_login_refused_raises_auth_error() -> None:
    """A login answered 401 raises VbaAuthError before any data call."""
    fake = FakeVba(login=problem(401, title="Unauthorized"))
    with pytest.raises(VbaAuthError) as caught, fake.client() as client:
        client.delete_accumulator("1", "G", "2026", "MED", "DED")
    assert (caught.value.status, fake.calls) == (401, [])


def test_login_unavailable_raises_unavailable() -> None:
    """A login answered 503 is retryable, not a credentials problem."""
    fake = FakeVba(login=problem(503, headers={"Retry-After": "2"}))
    with pytest.raises(VbaUnavailable) as caught, fake.client() as client:
        client.delete_accumulator("1", "G", "2026", "MED", "DED")
    assert caught.value.retry_after == 2.0


def test_login_sends_basic_credentials_and_client_headers() -> None:
    """The login carries Basic auth, api key, client id/code, database and User-Agent."""
    fake = FakeVba(vba_json(None, 204))
    with fake.client() as client:
        client.delete_accumulator("1", "G", "2026", "MED", "DED")
    login = fake.requests[0].headers
    assert login["Authorization"].startswith("Basic ")
    assert (login["x-api-key"], login["vbasoftware-client-id"]) == (API_KEY, "cid")
    assert (login["vbasoftware-client-code"], login["vbasoftware-database"]) == ("ccode", "UNITDB")
    assert login["User-Agent"] == USER_AGENT


def test_every_call_carries_vba_headers() -> None:
    """Data calls send x-api-key, Bearer token, database and an accumsync User-Agent."""
    fake = FakeVba(vba_json(None, 204))
    with fake.client() as client:
        client.delete_accumulator("1", "G", "2026", "MED", "DED")
    headers = fake.calls[0].headers
    assert headers["x-api-key"] == API_KEY
    assert headers["Authorization"] == "Bearer tok1"
    assert headers["vbasoftware-database"] == "UNITDB"
    assert headers["User-Agent"].startswith("accumsync/")


def test_token_is_reused_across_calls() -> None:
    """One login serves many calls."""
    fake = FakeVba(vba_json(None, 204), vba_json(None, 204), vba_json(None, 204))
    with fake.client() as client:
        for _ in range(3):
            client.delete_accumulator("1", "G", "2026", "MED", "DED")
    assert fake.tokens == 1


def test_path_ids_are_escaped() -> None:
    """Ids with slashes or spaces are percent-encoded into one path segment each."""
    fake = FakeVba(vba_json(None, 204))
    with fake.client() as client:
        client.delete_accumulator("1", "G/1", "2026", "MED", "A B")
    assert fake.calls[0].url.raw_path.decode().endswith("/groups/G%2F1/accumulators/2026/MED/A%20B")


def test_a_bare_model_binding_400_names_its_fields_and_trace() -> None:
    """ASP.NET refuses a body it can't bind before VBA's code runs: no envelope, a traceId and
    an ``errors`` map. The refusal carries the field's message and the trace as activity id."""
    body = {
        "type": "https://tools.ietf.org/html/rfc9110#section-15.5.1",
        "title": "One or more validation errors occurred.",
        "status": 400,
        "errors": {
            "$[3].entry_Date": ["The JSON value could not be converted to System.DateTime."]
        },
        "traceId": "00-abc-01",
    }
    fake = FakeVba(httpx.Response(400, json=body))
    with fake.client() as client, pytest.raises(VbaRejected) as info:
        client.delete_accumulator("1", "G", "2026", "MED", "DED")
    assert info.value.status == 400 and info.value.activity_id == "00-abc-01"
    assert "$[3].entry_Date: The JSON value could not be converted" in str(info.value)


def test_a_403_pauses_every_call_and_refreshes_no_token() -> None:
    """A 403 is configuration (a revoked key, a gateway rule): no refresh is tried, and the
    calls after it are paused without reaching VBA."""
    fake = FakeVba(httpx.Response(403, json={"message": "Forbidden"}))
    with fake.client() as client:
        with pytest.raises(VbaRejected):
            client.delete_accumulator("1", "G", "2026", "MED", "DED")
        with pytest.raises(VbaUnavailable, match="paused"):
            client.delete_accumulator("1", "G", "2026", "MED", "DED")
    assert len(fake.calls) == 1
    assert not [r for r in fake.requests if r.url.path.endswith("/user-refresh-tokens")]


def test_a_406_is_about_our_headers_and_may_have_landed() -> None:
    """A 406 refuses our Accept, not the records (never split into dead letters), and ASP.NET
    decides it after the action ran: the write's outcome is unknown."""
    from worker.vba.errors import refuses_data

    fake = FakeVba(problem(406, "Not Acceptable"))
    with fake.client() as client, pytest.raises(VbaRejected) as info:
        client.delete_accumulator("1", "G", "2026", "MED", "DED")
    assert not refuses_data(info.value) and info.value.may_have_landed
