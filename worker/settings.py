"""The one reader of the environment: every ACCUMSYNC_* setting (docs/configuration.md)."""

from __future__ import annotations

import ipaddress
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_HOME = Path.home() / ".accumsync"
SECRET_FILES = ("vba_password", "vba_api_key")


class NotConfigured(ValueError):
    """A setting a command needs is missing; the message names it."""


def _loopback(host: str | None) -> bool:
    if host in (None, ""):
        return False
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class Settings(BaseSettings):
    """accumsync's configuration. Secrets are ``SecretStr`` so nothing prints them by accident."""

    model_config = SettingsConfigDict(
        env_prefix="ACCUMSYNC_",
        env_file=".env",
        extra="ignore",
        frozen=True,
        # A settings error must not print its input: that is every ACCUMSYNC_* value, secrets too.
        hide_input_in_errors=True,
    )

    home: Path = Field(
        default=DEFAULT_HOME,
        description="where the embedded defaults keep their files (store, broker)",
        json_schema_extra={"shown_default": "~/.accumsync"},
    )
    broker_url: str = Field(
        default="",
        description="`redis://...` or `amqp://...`",
        json_schema_extra={"shown_default": "embedded SQLite broker"},
    )
    database_url: str = Field(
        default="",
        description="the store: `postgresql+psycopg://...`",
        json_schema_extra={"shown_default": "embedded SQLite file"},
    )
    redis_url: str = Field(
        default="",
        description="Redis for the shared VBA token, rate limit and locks",
        json_schema_extra={"shown_default": "the broker URL when it is Redis"},
    )
    queue: str = Field(
        default="accumsync",
        min_length=1,
        description="the ingest queue (`accumsync.ingest` messages)",
    )
    flush_queue: str = Field(
        default="",
        description="the flush tasks' queue (`accumsync.flush_due`, `flush_pair`, `push_plans`)",
        json_schema_extra={"shown_default": "`<queue>.flush` (`accumsync.flush`)"},
    )

    vba_base_url: str = Field(
        default="", description="e.g. `https://vbapi.vbasoftware.com/vbasoftware`"
    )
    vba_api_key: SecretStr = Field(default=SecretStr(""), description="VBA's `x-api-key`")
    vba_database: str = Field(default="", description="VBA's `vbasoftware-database` header")
    vba_username: str = Field(default="", description="the user for `/user-authentication`")
    vba_password: SecretStr = Field(
        default=SecretStr(""), description="the password for `/user-authentication`"
    )
    vba_api_key_file: Path | None = Field(
        default=None,
        description="read the API key from this file instead (Docker/Kubernetes secrets; a "
        "final newline is dropped); set the key or the file, not both. `accumsync sandbox` "
        "reads it too (`--api-key-file`); compose sets it",
    )
    vba_password_file: Path | None = Field(
        default=None,
        description="read the password from this file instead, as `VBA_API_KEY_FILE`; "
        "`accumsync sandbox` reads it too (`--password-file`)",
    )
    vba_client_id: str = Field(default="", description="VBA's `vbasoftware-client-id` header")
    vba_client_code: str = Field(default="", description="VBA's `vbasoftware-client-code` header")
    vba_rate: float = Field(
        default=25.0,
        gt=0,
        description="VBA calls/s of the fleet's token bucket (shared through Redis, or the "
        "store on the embedded defaults)",
    )
    vba_burst: int = Field(
        default=50,
        ge=1,
        description="VBA's burst; our bucket lets out a tenth less (at least 2 fewer), so calls "
        "delayed on their way do not arrive beside later ones as more than VBA's bucket holds",
    )
    vba_batch_max: int = Field(default=100, ge=1, le=10_000, description="items per batch PUT")
    vba_timeout: float = Field(
        default=30.0,
        gt=0,
        description="seconds VBA may take for each phase of a call: connect, write, await the "
        "answer",
    )
    vba_verify_tls: bool = Field(default=True, description="verify VBA's TLS certificate")
    vba_allow_http: bool = Field(
        default=False,
        description="allow `http://` to a non-loopback host (the compose sandbox)",
    )

    vba_audit_user: str = Field(
        default="ACCUMSYNC",
        min_length=1,
        max_length=20,
        description="update_User (and entry_User on create) of our writes: VBA's audit trail",
    )

    ownership: Literal["shared", "exclusive"] = Field(
        default="shared",
        description="`shared`: VBA's own amounts are kept; `exclusive`: the rows are ours alone "
        '(docs/design.md, "Ownership")',
    )
    flush_interval: float = Field(default=60.0, gt=0, description="seconds between beat's flushes")
    max_attempts: int = Field(
        default=10, ge=1, description="attempts per item before it becomes a dead letter"
    )
    backoff_base: float = Field(
        default=2.0, gt=0, description="seconds: the first retry's cap (full jitter)"
    )
    backoff_max: float = Field(default=900.0, gt=0, description="seconds: any retry's cap")
    flush_lease: float = Field(
        default=120.0,
        gt=0,
        description="seconds a pair's flush lease lasts, by the database's clock (a dead "
        "worker's lease expires)",
    )
    settle_grace: float = Field(
        default=120.0,
        gt=0,
        description="seconds a write of unknown outcome may still land, from the last moment its "
        "request may have left: only then is 'not there' read as not landed (shared) or a new "
        "total sent over it (exclusive); at least 4 x ACCUMSYNC_VBA_TIMEOUT",
    )
    dispatch_slots: int = Field(
        default=16,
        ge=1,
        description="`accumsync dispatch`: flushes it keeps queued or running at once (enough "
        "that VBA's budget, not the slots, limits the rate; at most the flush workers' processes "
        "are useful)",
    )
    dispatch_spacing: float = Field(
        default=1.0,
        ge=0,
        description="`accumsync dispatch`: seconds between the end of a pair's flush and the "
        "next it starts (changes arriving meanwhile go in one batch call)",
    )
    dispatch_round: float = Field(
        default=0.2,
        gt=0,
        le=5,
        description="`accumsync dispatch`: seconds between two rounds of admission",
    )
    fold_delay: float = Field(
        default=0.2,
        ge=0,
        le=60,
        description="Postgres: seconds an ingest worker's process waits before it folds the "
        "batches it recorded, with every other one committed by then (one fold for many "
        "batches costs less than one each; a change waits at most this for its totals)",
    )
    broker_visibility_timeout: float = Field(
        default=300.0,
        ge=2,
        description="Redis and embedded brokers: seconds before an unacknowledged message is "
        "delivered again (on Redis, a dead worker's come back sooner: "
        "ACCUMSYNC_BROKER_CONSUMER_TTL)",
    )
    broker_fetch: Literal["reliable", "kombu"] = Field(
        default="reliable",
        description="Redis broker: `reliable` takes each message by an atomic move into a list "
        "its worker owns (no message lost when a worker is killed); `kombu` is kombu's own "
        "fetch (kept safe on a full Redis), which loses the message a worker's main process is "
        "killed while taking: for comparison (`bench.ingest`) or as a way back",
    )
    broker_consumer_ttl: float = Field(
        default=10.0,
        ge=1,
        description="Redis broker: seconds a worker's heartbeat lasts; the messages a dead "
        "worker had taken (recorded or not) are back on their queues this long after it died",
    )
    broker_health_check_interval: float = Field(
        default=10.0, gt=0, description="Redis broker: seconds between checks of a silent link"
    )
    db_connect_timeout: int = Field(
        default=10, ge=2, description="Postgres: seconds a new connection may take (libpq: >= 2)"
    )
    db_link_timeout: int = Field(
        default=30,
        ge=3,
        description="Postgres: seconds a connection's network may stay silent (a partition, a "
        "failover) before the connection, and any transaction it left open on the server, is "
        "given up (libpq keepalives and `tcp_user_timeout`, and the session option "
        "`idle_in_transaction_session_timeout`; behind pgbouncer, list `options` in its "
        "`ignore_startup_parameters` and set that timeout on the server)",
    )
    vba_breaker_threshold: int = Field(
        default=3, ge=1, description="consecutive VBA failures that pause every worker's calls"
    )
    ingest_batch_size: int = Field(
        default=2000,
        ge=1,
        le=50_000,
        description="events per ingest message that `accumsync publish` and "
        "`worker.ingest.producer.publish` send (their batch size argument overrides it)",
    )

    health_max_dirty_age: float = Field(
        default=900.0, gt=0, description="`health`: seconds an accumulator may wait for its flush"
    )
    health_max_flush_age: float = Field(
        default=900.0,
        gt=0,
        description="`health`: seconds without a successful flush while work waits",
    )
    health_max_idle: float = Field(
        default=300.0,
        gt=0,
        description="`health`: seconds messages may wait with no task making progress "
        "(a stalled consumer)",
    )

    audit_retention_days: float = Field(
        default=30.0,
        ge=0,
        description="days the audit rows (ingest_batch, flush_attempt) are kept before beat's "
        "hourly prune deletes them; 0 keeps them for ever (the counters keep every total)",
    )

    reconcile_rate: float = Field(
        default=5.0,
        gt=0,
        description="VBA reads/s `reconcile` may take of the shared budget (below "
        "`VBA_RATE`: flushes keep the rest)",
    )
    reconcile_cron: str = Field(
        default="",
        description="beat reconciles every pair at these times (crontab: 'm h dom mon dow', e.g. "
        "'30 2 * * *'), report only, in resumable 30-minute slices",
        json_schema_extra={"shown_default": "off"},
    )

    log_format: Literal["text", "json"] = Field(
        default="text",
        description="`json`: one JSON object per line, Celery's own lines included",
    )
    log_level: str = Field(default="INFO", description="the log level of every process")

    @model_validator(mode="before")
    @classmethod
    def _secret_files(cls, data: Any) -> Any:
        """ACCUMSYNC_VBA_PASSWORD_FILE / _API_KEY_FILE: the secret is the file's content (its
        final newline dropped), the convention of Docker and Kubernetes secrets."""
        if not isinstance(data, dict):
            return data
        for name in SECRET_FILES:
            path = data.get(f"{name}_file")
            if not path:
                continue
            env = f"ACCUMSYNC_{name.upper()}"
            if data.get(name):
                raise ValueError(f"{env} and {env}_FILE are both set: keep one")
            try:
                data[name] = Path(path).read_text(encoding="utf-8").rstrip("\r\n")
            except (OSError, UnicodeDecodeError) as exc:
                why = getattr(exc, "strerror", None) or str(exc)
                raise ValueError(f"{env}_FILE: cannot read {path}: {why}") from None
        return data

    @field_validator("vba_base_url")
    @classmethod
    def _strip_slash(cls, v: str) -> str:
        return v.rstrip("/")

    @field_validator("reconcile_cron")
    @classmethod
    def _crontab(cls, v: str) -> str:
        if not v.strip():
            return ""
        from celery.schedules import crontab

        fields = v.split()
        if len(fields) != 5:
            raise ValueError("five fields, 'minute hour day-of-month month day-of-week'")
        try:
            minute, hour, day_of_month, month, day_of_week = fields
            crontab(
                minute=minute,
                hour=hour,
                day_of_month=day_of_month,
                month_of_year=month,
                day_of_week=day_of_week,
            )
        except ValueError as exc:
            raise ValueError(f"not a crontab line: {exc}") from None
        return " ".join(fields)

    @model_validator(mode="after")
    def _reconcile_leaves_room(self) -> Settings:
        """Reconcile takes a share of VBA's rate: the flush must keep the rest."""
        if self.reconcile_rate >= self.vba_rate:
            raise ValueError(
                f"ACCUMSYNC_RECONCILE_RATE ({self.reconcile_rate:g}/s) must be below "
                f"ACCUMSYNC_VBA_RATE ({self.vba_rate:g}/s): flushes need the rest"
            )
        return self

    @property
    def request_worst_case(self) -> float:
        """The longest one VBA request can last on our side, in seconds: httpx times each phase
        on its own, not the whole, so a request may take ``vba_timeout`` to connect, as long to
        write its head and again its body, then as long awaiting the answer (the client's pool
        never makes a request wait): four times ``vba_timeout``."""
        return 4 * self.vba_timeout

    @model_validator(mode="after")
    def _grace_outlasts_a_request(self) -> Settings:
        """A write of unknown outcome may still land while its request can be under way: only
        after that may 'VBA's row is as before' mean 'not landed', or a resend go out."""
        if self.settle_grace < self.request_worst_case:
            raise ValueError(
                f"ACCUMSYNC_SETTLE_GRACE ({self.settle_grace:g}s) must be at least the longest a "
                f"VBA request can last, 4 x ACCUMSYNC_VBA_TIMEOUT ({self.request_worst_case:g}s: "
                "connect, write the head, write the body, await the answer, each timed on its "
                "own): a write may land until then"
            )
        return self

    @model_validator(mode="after")
    def _https_only(self) -> Settings:
        """VBA is HTTPS only; plain HTTP is for the sandbox on loopback or an explicit opt-in."""
        url = urlsplit(self.vba_base_url)
        if url.scheme == "http" and not (_loopback(url.hostname) or self.vba_allow_http):
            raise ValueError(
                "ACCUMSYNC_VBA_BASE_URL: http:// is refused for a non-loopback host; "
                "use https:// or set ACCUMSYNC_VBA_ALLOW_HTTP=true"
            )
        if url.scheme not in ("", "http", "https"):
            raise ValueError("ACCUMSYNC_VBA_BASE_URL: scheme must be https (or http on loopback)")
        return self

    @property
    def effective_flush_queue(self) -> str:
        """The flush tasks' queue: the setting, or ``<queue>.flush`` (``accumsync.flush``)."""
        return self.flush_queue or f"{self.queue}.flush"

    @property
    def effective_database_url(self) -> str:
        """The store: the setting, or an embedded SQLite file under ``home``."""
        return self.database_url or f"sqlite:///{self.home / 'accumsync.db'}"

    @property
    def effective_broker_url(self) -> str:
        """The broker: the setting, or kombu's SQLAlchemy transport on a SQLite file."""
        return self.broker_url or f"sqla+sqlite:///{self.home / 'broker.db'}"

    @property
    def effective_redis_url(self) -> str | None:
        """Redis for the shared token, rate limit and locks; None on the embedded defaults."""
        if self.redis_url:
            return self.redis_url
        if self.broker_url.startswith(("redis://", "rediss://")):
            return self.broker_url
        return None

    @property
    def embedded(self) -> bool:
        """True when the store is the embedded SQLite file (one worker process assumed)."""
        return self.effective_database_url.startswith("sqlite")


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process's settings, read once; tests call ``get_settings.cache_clear()``."""
    return Settings()
