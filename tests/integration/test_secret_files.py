"""One pair of secret files serves both sides, as compose mounts them: ``accumsync sandbox`` and
the worker's settings read ACCUMSYNC_VBA_API_KEY_FILE and ACCUMSYNC_VBA_PASSWORD_FILE."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.stack import ACCUMSYNC
from worker.demo.sandboxes import free_port
from worker.sandbox import config as c
from worker.settings import Settings
from worker.vba.client import VbaClient
from worker.vba.errors import VbaRejected

KEY, PASSWORD = "file-key-5d1c9e", "file-pass-88b2a4"


@pytest.fixture
def secret_env(tmp_path: Path) -> dict[str, str]:
    """The two variables compose sets, each naming a file (a final newline, as editors save)."""
    (tmp_path / "vba_api_key").write_text(KEY + "\n")
    (tmp_path / "vba_password").write_text(PASSWORD + "\n")
    return {
        "ACCUMSYNC_VBA_API_KEY_FILE": str(tmp_path / "vba_api_key"),
        "ACCUMSYNC_VBA_PASSWORD_FILE": str(tmp_path / "vba_password"),
    }


@pytest.fixture
def sandbox_url(secret_env: dict[str, str], tmp_path: Path) -> Iterator[str]:
    """``accumsync sandbox`` as compose runs it: no credential flags, the variables only."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("ACCUMSYNC_")} | secret_env
    log = (tmp_path / "sandbox.log").open("wb")
    proc = subprocess.Popen(
        [ACCUMSYNC, "sandbox", "--port", str(port)], env=env, stdout=log, stderr=log
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                httpx.get(url + "/_admin/health", timeout=1)
                break
            except httpx.TransportError:
                time.sleep(0.1)
        assert proc.poll() is None, (tmp_path / "sandbox.log").read_text()
        yield url
    finally:
        proc.terminate()
        proc.wait(10)
        log.close()


def client(url: str, **secrets: object) -> VbaClient:
    settings = Settings(
        _env_file=None,  # type: ignore[call-arg]
        vba_base_url=url,
        vba_allow_http=True,
        vba_database=c.DATABASE,
        vba_username=c.USERNAME,
        vba_client_id=c.CLIENT_ID,
        vba_client_code=c.CLIENT_CODE,
        redis_url="",
        broker_url="",
        **secrets,
    )
    return VbaClient(settings)


def test_sandbox_and_worker_share_the_secret_files(
    sandbox_url: str, secret_env: dict[str, str]
) -> None:
    """The worker, its secrets read from the files, logs in to the sandbox that read the same
    files; the well-known sandbox credentials are refused there."""
    files = {
        "vba_api_key_file": Path(secret_env["ACCUMSYNC_VBA_API_KEY_FILE"]),
        "vba_password_file": Path(secret_env["ACCUMSYNC_VBA_PASSWORD_FILE"]),
    }
    with client(sandbox_url, **files) as vba:
        assert vba.list_accumulators("S1", "G1").items == []  # logged in; VBA knows nobody yet
    well_known = client(sandbox_url, vba_api_key=c.API_KEY, vba_password=c.PASSWORD)
    with well_known as vba, pytest.raises(VbaRejected) as refused:
        vba.list_accumulators("S1", "G1")
    assert refused.value.status in (401, 403)


def test_a_value_and_a_file_for_the_sandbox_is_refused(secret_env: dict[str, str]) -> None:
    """``--api-key`` beside ACCUMSYNC_VBA_API_KEY_FILE: exit 2 naming both, the key unprinted."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ACCUMSYNC_")} | secret_env
    argv = [ACCUMSYNC, "sandbox", "--port", str(free_port()), "--api-key", "other-key-77"]
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "--api-key and --api-key-file are both set" in proc.stderr
    assert KEY not in proc.stderr + proc.stdout
