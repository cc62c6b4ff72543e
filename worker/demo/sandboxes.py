"""Test helpers shipped with the sandbox: run it as a real subprocess and drive its admin API."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
from pydantic import SecretStr

from models.vba import loads
from worker.sandbox import config as c
from worker.sandbox.dialect import dumps
from worker.settings import Settings

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _flag(name: str, value: Any) -> list[str]:
    """``accumsync sandbox`` options for one flag; None leaves the option at its default."""
    opt = "--" + name.replace("_", "-")
    if value is None:
        return []
    if isinstance(value, bool):
        return [opt if value else "--no-" + opt[2:]]
    return [opt, str(value)]


def vba_headers(token: str, user_agent: str) -> dict[str, str]:
    """Correct VBA headers for the sandbox's well-known credentials, for hand-made calls."""
    return {
        "x-api-key": c.API_KEY,
        "Authorization": f"Bearer {token}",
        "vbasoftware-database": c.DATABASE,
        "User-Agent": user_agent,
    }


class SandboxAdmin:
    """The /_admin/ API of one sandbox; amounts come back as Decimal.

    Amounts go out with every digit given (a strict sandbox keeps more than 2; lax refuses them).
    """

    def __init__(self, url: str, token: str | None = None) -> None:
        headers = {"x-admin-token": token} if token else {}
        self.http = httpx.Client(base_url=url + "/_admin", headers=headers, timeout=10)

    def _call(self, method: str, path: str, payload: Any = None) -> Any:
        body = None if payload is None else dumps(payload)
        response = self.http.request(method, path, content=body)
        response.raise_for_status()
        return loads(response.content)

    def rows(self) -> list[dict[str, Any]]:
        """Every subscriber accumulator row, as VBA would serve it."""
        result: list[dict[str, Any]] = self._call("GET", "/rows")["subscriber"]
        return result

    def plans(self) -> list[dict[str, Any]]:
        """Every plan accumulator row."""
        result: list[dict[str, Any]] = self._call("GET", "/rows")["plans"]
        return result

    def seed(
        self,
        subscriber: Sequence[dict[str, Any]] = (),
        plans: Sequence[dict[str, Any]] = (),
        raw: bool = False,
    ) -> Any:
        """Rows VBA already has before accumsync writes (missing amounts are 0); ``raw`` stores
        them unchecked (odd rows: nulls, long strings)."""
        payload = {"subscriber": list(subscriber), "plans": list(plans), "raw": raw}
        return self._call("POST", "/seed", payload)

    def adjust(self, key: dict[str, str], deltas: dict[str, Any]) -> dict[str, Any]:
        """VBA's own adjudication adds ``deltas`` to a row (created at zero if absent)."""
        result: dict[str, Any] = self._call("POST", "/adjust", {"key": key, "deltas": deltas})
        return result

    def set_faults(self, **faults: Any) -> dict[str, Any]:
        """Change faults (see worker.sandbox.config.Faults); ``expire_tokens=True`` expires all."""
        result: dict[str, Any] = self._call("POST", "/faults", faults)
        return result

    def intrude(
        self,
        after: str,
        subscriber_ID: str,
        group_ID: str,
        deltas: dict[str, Any],
        keys: Sequence[dict[str, str]] | None = None,
        times: int = 1,
        skip: int = 0,
    ) -> dict[str, Any]:
        """VBA adds ``deltas`` right after a matching call ("list" or "batch") of the pair.

        ``keys`` (plan_Year, plan_Type, benefit_Code) default to the rows the call returned or
        wrote; ``skip`` matching calls pass first; it fires ``times`` times, then is gone.
        """
        body: dict[str, Any] = {
            "after": after,
            "subscriber_ID": subscriber_ID,
            "group_ID": group_ID,
        }
        body |= {"deltas": deltas, "times": times, "skip": skip}
        if keys is not None:
            body["keys"] = list(keys)
        result: dict[str, Any] = self._call("POST", "/intrude", body)
        return result

    def intrusions(self) -> list[dict[str, Any]]:
        """Pending intrusions, with the ``skip`` and ``times`` they have left."""
        result: list[dict[str, Any]] = self._call("GET", "/intrude")["intrusions"]
        return result

    def journal(self, since: int = 0) -> list[dict[str, Any]]:
        """Every write to a row after ``since`` (a seq), oldest first; amounts as Decimal."""
        result: list[dict[str, Any]] = self._call("GET", f"/journal?since={since}")["writes"]
        return result

    def counters(self) -> dict[str, Any]:
        """Requests per route and status: ``{"total", "by_route", "by_status"}`` (0: reset)."""
        result: dict[str, Any] = self._call("GET", "/counters")
        return result

    def reset(self) -> None:
        """No rows, tokens, counts, writes or intrusions; the start-up faults."""
        self._call("POST", "/reset")

    def close(self) -> None:
        self.http.close()


class SandboxHandle:
    """A sandbox subprocess on 127.0.0.1: its url, admin API, and stop/start to fake an outage."""

    def __init__(self, port: int, flags: dict[str, Any], log_path: Path) -> None:
        self.port, self.flags, self.log_path = port, flags, log_path
        self.url = f"http://127.0.0.1:{port}"
        self.admin = SandboxAdmin(self.url, flags.get("admin_token"))
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 20.0) -> None:
        """Start the process (same port, same flags) and wait until it answers."""
        args = [sys.executable, "-m", "worker.sandbox", "--port", str(self.port)]
        for name, value in self.flags.items():
            args += _flag(name, value)
        path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
        # Its credentials are its flags: the secret files meant for a real VBA are not its own.
        secret_files = ("ACCUMSYNC_VBA_API_KEY_FILE", "ACCUMSYNC_VBA_PASSWORD_FILE")
        env = {k: v for k, v in os.environ.items() if k not in secret_files} | {"PYTHONPATH": path}
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(args, cwd=ROOT, env=env, stdout=log, stderr=log)
        self._wait(timeout)

    def _wait(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(f"sandbox exited: {self.log_path.read_text()[-2000:]}")
            try:
                if httpx.get(self.url + "/_admin/health", timeout=1).status_code < 500:
                    return
            except httpx.TransportError:
                time.sleep(0.1)
        tail = self.log_path.read_text()[-2000:]
        raise RuntimeError(f"sandbox did not answer in {timeout}s: {tail}")

    def stop(self) -> None:
        """Kill the process (state survives only with ``state=FILE``)."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        self.process = None

    def settings(self, **overrides: Any) -> Settings:
        """Settings pointing the client at this sandbox with its credentials (no Redis)."""
        return Settings(**(sandbox_settings_kwargs(self.url, self.flags) | overrides))

    def env(self) -> dict[str, str]:
        """The same as ACCUMSYNC_* environment variables, for worker subprocesses."""
        kwargs = sandbox_settings_kwargs(self.url, self.flags)
        return {f"ACCUMSYNC_{k.upper()}": _plain(v) for k, v in kwargs.items()}


def _plain(value: Any) -> str:
    return value.get_secret_value() if isinstance(value, SecretStr) else str(value)


def sandbox_settings_kwargs(url: str, flags: dict[str, Any]) -> dict[str, Any]:
    """The Settings fields that reach a sandbox at ``url`` started with ``flags``."""
    return {
        "vba_base_url": url,
        "vba_api_key": SecretStr(flags.get("api_key", c.API_KEY)),
        "vba_database": flags.get("database", c.DATABASE),
        "vba_username": flags.get("username", c.USERNAME),
        "vba_password": SecretStr(flags.get("password", c.PASSWORD)),
        "vba_client_id": flags.get("client_id", c.CLIENT_ID),
        "vba_client_code": flags.get("client_code", c.CLIENT_CODE),
        "redis_url": "",
        "broker_url": "",
    }


@contextmanager
def running_sandbox(**flags: Any) -> Iterator[SandboxHandle]:
    """A sandbox subprocess for the block; ``flags`` are ``accumsync sandbox`` options."""
    with tempfile.TemporaryDirectory(prefix="accumsync-sandbox-") as tmp:
        handle = SandboxHandle(free_port(), flags, Path(tmp) / "sandbox.log")
        try:
            handle.start()
            yield handle
        finally:
            handle.stop()
            handle.admin.close()
