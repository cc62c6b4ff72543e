"""Security: TLS verified by default, no plain HTTP off loopback, secrets never printed, and the
sandbox refusing bad credentials the way VBA does (the cases test_vba_client.py leaves out)."""

from __future__ import annotations

import base64
import http.server
import ssl
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from pydantic import SecretStr, ValidationError

from tests.chaos.conftest import API_KEY, PASSWORD
from tests.stack import ACCUMSYNC
from worker.demo.sandboxes import SandboxHandle, running_sandbox
from worker.sandbox import config as sandbox_config
from worker.settings import Settings
from worker.vba import VbaClient, VbaUnavailable

pytestmark = pytest.mark.chaos

SUB, GROUP = "123456789", "GRP1"


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """An HTTPS server on loopback with a self-signed certificate nobody trusts."""
    tmp = tmp_path_factory.mktemp("tls")
    cert, key = tmp / "cert.pem", tmp / "key.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=127.0.0.1",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
    )
    server = http.server.HTTPServer(("127.0.0.1", 0), Answer)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"https://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


class Answer(http.server.BaseHTTPRequestHandler):
    """Answers every request 503: enough to tell "TLS refused" from "reached the server"."""

    def do_POST(self) -> None:
        self.send_response(503)
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_GET = do_POST

    def log_message(self, format: str, *args: object) -> None:
        pass


def settings(url: str, **overrides: object) -> Settings:
    values: dict[str, object] = {
        "vba_base_url": url,
        "vba_api_key": SecretStr(API_KEY),
        "vba_password": SecretStr(PASSWORD),
        "vba_username": "u",
        "vba_database": "d",
        "redis_url": "",
        "broker_url": "",
    }
    return Settings(**(values | overrides))  # type: ignore[arg-type]


def test_tls_is_verified_by_default(tls_server: str) -> None:
    """An untrusted certificate is refused unless verification is switched off on purpose."""
    assert Settings().vba_verify_tls is True
    with VbaClient(settings(tls_server)) as client, pytest.raises(VbaUnavailable) as refused:
        client.list_accumulators(SUB, GROUP)
    assert isinstance(refused.value.__cause__, httpx.ConnectError)
    assert "CERTIFICATE_VERIFY_FAILED" in str(refused.value.__cause__)
    unverified = settings(tls_server, vba_verify_tls=False)
    with VbaClient(unverified) as client, pytest.raises(VbaUnavailable) as reached:
        client.list_accumulators(SUB, GROUP)
    assert reached.value.status == 503  # past TLS: the server itself answered


@pytest.mark.parametrize(
    ("url", "allowed"),
    [
        ("https://vbapi.vbasoftware.com/vbasoftware", True),
        ("http://127.0.0.1:8700", True),
        ("http://localhost:8700", True),
        ("http://[::1]:8700", True),
        ("http://vbapi.vbasoftware.com/vbasoftware", False),
        ("http://10.0.0.5:8700", False),
        ("ftp://vbapi.vbasoftware.com", False),
    ],
)
def test_plain_http_only_on_loopback(url: str, allowed: bool) -> None:
    """http:// is refused for any host but loopback, with a message that names no secret."""
    if allowed:
        assert settings(url).vba_base_url == url
        return
    with pytest.raises(ValidationError) as refused:
        settings(url)
    text = str(refused.value)
    assert "ACCUMSYNC_VBA_BASE_URL" in text
    assert API_KEY not in text and PASSWORD not in text


def test_plain_http_off_loopback_needs_the_explicit_opt_in() -> None:
    """ACCUMSYNC_VBA_ALLOW_HTTP=true lets a non-loopback http:// URL through, on purpose only."""
    url = "http://vba.internal:8700"
    assert settings(url, vba_allow_http=True).vba_base_url == url


def test_secrets_are_secretstr_and_never_printed(tmp_path: Path) -> None:
    """repr, JSON dumps, `accumsync status` and a configuration error show no secret."""
    s = settings("https://vba.example.com")
    assert isinstance(s.vba_api_key, SecretStr) and isinstance(s.vba_password, SecretStr)
    for text in (repr(s), str(s), s.model_dump_json()):
        assert API_KEY not in text and PASSWORD not in text
    env = {
        "PATH": "/usr/bin:/bin",
        "ACCUMSYNC_HOME": str(tmp_path / "home"),
        "ACCUMSYNC_VBA_API_KEY": API_KEY,
        "ACCUMSYNC_VBA_PASSWORD": PASSWORD,
        "ACCUMSYNC_VBA_BASE_URL": "https://vba.example.com",
    }
    run = [ACCUMSYNC, "db", "upgrade"], [ACCUMSYNC, "status"], [ACCUMSYNC, "status", "--json"]
    outputs = [subprocess.run(a, env=env, capture_output=True, text=True, timeout=120) for a in run]
    assert all(p.returncode == 0 for p in outputs), [p.stderr for p in outputs]
    bad = env | {"ACCUMSYNC_VBA_BASE_URL": "http://vba.example.com"}  # a configuration error
    refused = subprocess.run(
        [ACCUMSYNC, "status"], env=bad, capture_output=True, text=True, timeout=120
    )
    assert refused.returncode != 0 and "ACCUMSYNC_VBA_BASE_URL" in refused.stderr
    for proc in [*outputs, refused]:
        assert API_KEY not in proc.stdout + proc.stderr
        assert PASSWORD not in proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def sandbox() -> Iterator[SandboxHandle]:
    with running_sandbox() as handle:
        key = {"plan_Year": "2026", "plan_Type": "MED", "benefit_Code": "DED"}
        handle.admin.seed(subscriber=[{"subscriber_ID": SUB, "group_ID": GROUP} | key])
        yield handle  # a member VBA knows: its list answers 200 (strict: 404 for a stranger)


def token(sandbox: SandboxHandle) -> str:
    """A real id token from the sandbox."""
    client = VbaClient(sandbox.settings())
    with client:
        return client.auth.token()


def good_headers(sandbox: SandboxHandle) -> dict[str, str]:
    return {
        "x-api-key": sandbox_config.API_KEY,
        "vbasoftware-database": sandbox_config.DATABASE,
        "Authorization": f"Bearer {token(sandbox)}",
        "User-Agent": "accumsync-test",
    }


@pytest.mark.parametrize(
    ("change", "status"),
    [
        ({"x-api-key": "wrong"}, 403),
        ({"vbasoftware-database": "OTHERDB"}, 400),
        ({"Authorization": None}, 401),
        ({"Authorization": "Basic c2FuZGJveDpzYW5kYm94LXBhc3N3b3Jk"}, 401),
    ],
)
def test_sandbox_refuses_data_calls_with_bad_headers(
    sandbox: SandboxHandle, change: dict[str, str | None], status: int
) -> None:
    """A data call with a wrong key, database or no bearer token is refused as VBA does."""
    headers = {k: v for k, v in (good_headers(sandbox) | change).items() if v is not None}
    path = f"/subscribers/{SUB}/groups/{GROUP}/accumulators-batch"
    answer = httpx.put(sandbox.url + path, headers=headers, content="[]", timeout=10)
    assert answer.status_code == status
    ok = httpx.get(sandbox.url + path.removesuffix("-batch"), headers=good_headers(sandbox))
    assert ok.status_code == 200  # the same call with good headers goes through


@pytest.mark.parametrize(
    "change",
    [
        {"vbasoftware-client-id": "someone-else"},
        {"vbasoftware-client-code": "OTHER"},
        {"Authorization": None},
    ],
)
def test_sandbox_refuses_logins_with_bad_client_headers(
    sandbox: SandboxHandle, change: dict[str, str | None]
) -> None:
    """A login with a wrong client id or code, or no credentials at all, is a 401."""
    c = sandbox_config
    basic = "Basic " + base64.b64encode(f"{c.USERNAME}:{c.PASSWORD}".encode()).decode()
    headers = {
        "x-api-key": c.API_KEY,
        "vbasoftware-database": c.DATABASE,
        "vbasoftware-client-id": c.CLIENT_ID,
        "vbasoftware-client-code": c.CLIENT_CODE,
        "Authorization": basic,
        "User-Agent": "accumsync-test",
    }
    good = httpx.post(sandbox.url + "/user-authentication", headers=headers, timeout=10)
    assert good.status_code == 200
    headers = {k: v for k, v in (headers | change).items() if v is not None}
    answer = httpx.post(sandbox.url + "/user-authentication", headers=headers, timeout=10)
    assert answer.status_code == 401


def test_sandbox_refuses_a_forged_refresh_token(sandbox: SandboxHandle) -> None:
    """A refresh with a token VBA never issued (or for another id token) is a 401."""
    c = sandbox_config
    headers = {
        "x-api-key": c.API_KEY,
        "vbasoftware-database": c.DATABASE,
        "vbasoftware-client-id": c.CLIENT_ID,
        "vbasoftware-client-code": c.CLIENT_CODE,
        "expired-id-token": token(sandbox),
        "refresh-token": "forged-refresh-token",
        "User-Agent": "accumsync-test",
    }
    answer = httpx.post(sandbox.url + "/user-refresh-tokens", headers=headers, timeout=10)
    assert answer.status_code == 401
