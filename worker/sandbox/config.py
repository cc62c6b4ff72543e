"""The sandbox's configuration: credentials it accepts, VBA's rate limit, and injected faults."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

# Well-known sandbox credentials (not secrets: the emulator runs on loopback for tests and demos).
API_KEY = "sandbox-api-key"
DATABASE = "sandbox"
USERNAME = "sandbox"
PASSWORD = "sandbox-password"  # noqa: S105
CLIENT_ID = "accumsync"
CLIENT_CODE = "SANDBOX"

Share = float  # a probability, 0..1
LostAnswer = Literal["504", "reset", "hang"]
#: The status a gateway answers at once for a call VBA goes on working at: 502, 504, or either.
LateStatus = Literal["502", "504", "either"]
#: "lax" answers as our client expects; "strict" as a real VBA most likely would (see dialect.py).
Dialect = Literal["lax", "strict"]
#: How a 207 item's ``id`` spells key names: the seeds' ``subscriber_ID``, or ``subscriberID``.
IdSpelling = Literal["exact", "camel"]


class Faults(BaseModel):
    """What the sandbox breaks on purpose; set by flags or ``POST /_admin/faults``."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    error_500: Share = Field(default=0.0, ge=0, le=1, description="share of calls answered 500")
    error_502: Share = Field(default=0.0, ge=0, le=1)
    error_503: Share = Field(default=0.0, ge=0, le=1)
    rate_429: Share = Field(default=0.0, ge=0, le=1, description="a 429 storm: share answered 429")
    retry_after: float = Field(default=1.0, ge=0, description="seconds sent in Retry-After")
    retry_after_date: bool = Field(default=False, description="send Retry-After as an HTTP date")
    latency: float = Field(default=0.0, ge=0, description="seconds added to every answer")
    timeout_rate: Share = Field(default=0.0, ge=0, le=1, description="share of calls that hang")
    timeout_seconds: float = Field(default=35.0, ge=0, description="how long a hung call hangs")
    item_error_rate: Share = Field(default=0.0, ge=0, le=1, description="207 items answered 500")
    item_written_error_rate: Share = Field(
        default=0.0, ge=0, le=1, description="share of 207 items written, then answered 500"
    )
    item_written_errors: int = Field(
        default=0, ge=0, description="the next N 207 items are written, then answered 500"
    )
    lost_answer_rate: Share = Field(
        default=0.0, ge=0, le=1, description="share of batch calls written, then answer lost"
    )
    lost_answers: int = Field(
        default=0, ge=0, description="the next N batch calls are written, then answer lost"
    )
    lost_answer: LostAnswer = Field(
        default="504", description="how: a 504, a connection reset, or a hang then a 504"
    )
    late_rate: Share = Field(
        default=0.0,
        ge=0,
        le=1,
        description="share of batch calls a gateway answers at once (502 or 504) while VBA goes "
        "on: the writes land late_seconds later",
    )
    late_answers: int = Field(
        default=0, ge=0, description="the next N batch calls answered at once, written later"
    )
    late_status: LateStatus = Field(
        default="either", description="the gateway's answer to a late call: 502, 504 or either"
    )
    late_seconds: float = Field(
        default=0.5, ge=0, description="seconds after the answer that a late call's writes land"
    )
    late_never: Share = Field(
        default=0.0, ge=0, le=1, description="share of late calls whose writes never land"
    )
    list_gateway_404_rate: Share = Field(
        default=0.0,
        ge=0,
        le=1,
        description="share of lists a gateway answers 404 (no VBA envelope: not 'no rows')",
    )
    list_gateway_404s: int = Field(
        default=0, ge=0, description="the next N lists answered 404 by a gateway"
    )
    list_delay: float = Field(
        default=0.0, ge=0, description="seconds a list waits before reading its rows"
    )
    slow_lists: int | None = Field(
        default=None, ge=0, description="how many lists wait list_delay (None: all)"
    )
    list_status: int | None = Field(
        default=None, ge=400, le=599, description="every list answers this error status"
    )
    forbidden: bool = Field(
        default=False, description="the gateway answers 403 to every call (a revoked key)"
    )
    refuse_batch_with: str | None = Field(
        default=None,
        description="a batch holding a record with this benefit_Code (or accum_Name) is "
        "refused whole with a model-binding 400, as VBA refuses a value it can't bind",
    )
    shuffle: bool = Field(default=False, description="shuffle data[] of a 207")
    token_ttl: float = Field(default=86400.0, gt=0, description="lifetime of new id tokens")
    down: bool = Field(default=False, description="answer 503 to every VBA call")


@dataclass
class SandboxConfig:
    """Everything ``create_app`` needs; the defaults are the well-known sandbox credentials."""

    api_key: str = API_KEY
    database: str = DATABASE
    username: str = USERNAME
    password: str = PASSWORD
    client_id: str = CLIENT_ID
    client_code: str = CLIENT_CODE
    rate: float = 25.0
    burst: int = 50
    state: Path | None = None
    admin_token: str | None = None
    seed: int | None = None
    faults: Faults = field(default_factory=Faults)
    dialect: Dialect = "strict"
    id_spelling: IdSpelling = "exact"
