"""A scripted VBA behind httpx.MockTransport, for the client's unit tests."""

from __future__ import annotations

import json
from collections.abc import Callable
from decimal import Decimal
from typing import Any

import httpx
from pydantic import SecretStr

from models.buckets import VBA_FIELDS
from models.vba import dumps
from worker.settings import Settings
from worker.vba import VbaClient

API_KEY = "unit-api-key-7f3a"
PASSWORD = "unit-password-9c1e"
Answer = httpx.Response | Exception | Callable[[httpx.Request], httpx.Response]


def record(benefit_code: str = "DED", **overrides: Any) -> dict[str, Any]:
    """A valid SubscriberAccum payload with every amount 1.10."""
    row: dict[str, Any] = {
        "subscriber_ID": "123456789",
        "group_ID": "GRP1",
        "plan_Year": "2026",
        "plan_Type": "MED",
        "benefit_Code": benefit_code,
    }
    return row | dict.fromkeys(VBA_FIELDS, Decimal("1.10")) | overrides


def vba_json(data: Any, status: int = 200, **kwargs: Any) -> httpx.Response:
    """An answer in VBA's envelope."""
    body = {"data": data, "error": None, "debug": {"activityId": "act-1"}}
    return httpx.Response(status, content=dumps(body), **kwargs)


def problem(status: int, title: str = "Bad", detail: str = "nope", **kwargs: Any) -> httpx.Response:
    """An error answer with problem details."""
    error = {"type": None, "title": title, "status": status, "detail": detail, "instance": None}
    body = {"data": None, "error": error, "debug": {"activityId": f"act-{status}"}}
    return httpx.Response(status, content=json.dumps(body), **kwargs)


class FakeVba:
    """Login and refresh always work (tokens tok1, tok2, ...); other calls get queued answers."""

    def __init__(self, *answers: Answer, login: httpx.Response | None = None) -> None:
        self.answers = list(answers)
        self.login = login
        self.requests: list[httpx.Request] = []
        self.tokens = 0

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        if request.url.path.endswith(("/user-authentication", "/user-refresh-tokens")):
            if self.login is not None:
                return self.login
            self.tokens += 1
            result = {"idToken": f"tok{self.tokens}", "refreshToken": "refresh-secret-1"}
            return vba_json({"authenticationResult": result | {"expiresIn": 86400}})
        answer = self.answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer(request) if callable(answer) else answer

    @property
    def calls(self) -> list[httpx.Request]:
        """The requests other than login and refresh."""
        return [r for r in self.requests if "/user-" not in r.url.path]

    def client(self, **overrides: Any) -> VbaClient:
        """A VbaClient talking to this fake, without Redis."""
        return VbaClient(unit_settings(**overrides), transport=httpx.MockTransport(self))


def unit_settings(**overrides: Any) -> Settings:
    """Settings for a VBA at https://vba.test, no Redis."""
    fields: dict[str, Any] = {
        "vba_base_url": "https://vba.test/vbasoftware",
        "vba_api_key": SecretStr(API_KEY),
        "vba_database": "UNITDB",
        "vba_username": "unit-user",
        "vba_password": SecretStr(PASSWORD),
        "vba_client_id": "cid",
        "vba_client_code": "ccode",
        "redis_url": "",
        "broker_url": "",
    }
    return Settings(_env_file=None, **(fields | overrides))  # type: ignore[call-arg]
