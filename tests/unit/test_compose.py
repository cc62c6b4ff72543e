"""compose.yaml checked without a Docker engine: structure, health checks, one beat, and only
commands the test-suite itself runs against real processes."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import typer
import yaml

from tests.integration.test_flower import flower_argv
from tests.integration.test_ops_health import HEALTH
from tests.integration.test_ops_metrics import metrics_argv
from worker.cli import app as cli_app
from worker.demo.procs import beat_argv, worker_argv
from worker.sandbox.cli import sandbox as sandbox_command

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "compose.yaml"
SERVICES = {"redis", "postgres", "migrate", "sandbox", "worker", "beat", "flower", "metrics"}
APP_SERVICES = SERVICES - {"redis", "postgres"}
TESTS = ROOT / "tests"


def _tail(argv: list[str], after: str) -> list[str]:
    """``argv`` from the word ``after`` on (drops ``python -m celery`` vs ``celery`` prefixes)."""
    return argv[argv.index(after) :]


#: Each compose command (from its program word on) -> the argv the test-suite runs for it.
EXERCISED: dict[tuple[str, ...], list[str]] = {
    ("celery", "-A", "worker", "worker"): ["celery", *_tail(worker_argv("n", 2, ["q"]), "-A")],
    ("celery", "-A", "worker", "beat"): ["celery", *_tail(beat_argv(Path("s")), "-A")],
    ("celery", "-A", "worker", "flower"): ["celery", *_tail(flower_argv(1), "-A")],
    ("accumsync", "metrics"): ["accumsync", *_tail(metrics_argv(1), "metrics")],
    ("accumsync", "health"): ["accumsync", *HEALTH],
    ("accumsync", "db", "upgrade"): ["accumsync", "db", "upgrade"],  # every Stack runs it
}


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    return loaded


def options(argv: list[str]) -> set[str]:
    return {word.split("=")[0] for word in argv if word.startswith("-") and word != "-A"}


def test_services_and_redis_durability(compose: dict[str, Any]) -> None:
    """All eight services; Redis keeps an append-only file and never evicts queued messages."""
    services = compose["services"]
    assert set(services) == SERVICES
    redis = " ".join(services["redis"]["command"])
    assert "--appendonly yes" in redis and "--maxmemory-policy noeviction" in redis


def test_exactly_one_beat(compose: dict[str, Any]) -> None:
    """One service runs beat, with one replica; no other command starts a beat."""
    services = compose["services"]
    beats = [name for name, s in services.items() if "beat" in (s.get("command") or [])]
    assert beats == ["beat"]
    assert services["beat"]["deploy"]["replicas"] == 1
    assert all("-B" not in (s.get("command") or []) for s in services.values())


def test_order_and_healthchecks(compose: dict[str, Any]) -> None:
    """Workers wait for healthy stores and a finished migration; long-lived services have checks."""
    services = compose["services"]
    for name in ("worker", "beat", "flower", "metrics"):
        deps = services[name]["depends_on"]
        assert deps["redis"]["condition"] == "service_healthy", name
        assert deps["postgres"]["condition"] == "service_healthy", name
        assert deps["migrate"]["condition"] == "service_completed_successfully", name
    assert services["worker"]["depends_on"]["sandbox"]["condition"] == "service_healthy"
    assert services["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert services["migrate"]["restart"] == "no"
    for name in SERVICES - {"migrate", "beat"}:
        assert services[name]["healthcheck"]["test"][0] == "CMD", name


def test_environment_points_at_redis_and_postgres(compose: dict[str, Any]) -> None:
    """Every accumsync service shares the broker and store URLs; secrets come from outside."""
    for name in APP_SERVICES:
        env = compose["services"][name]["environment"]
        assert env["ACCUMSYNC_BROKER_URL"].startswith("redis://redis:6379")
        assert env["ACCUMSYNC_DATABASE_URL"].startswith("postgresql+psycopg://")
        assert "${POSTGRES_PASSWORD:?" in env["ACCUMSYNC_DATABASE_URL"]
    flower = compose["services"]["flower"]["environment"]["FLOWER_BASIC_AUTH"]
    assert flower == "${FLOWER_USER:?set FLOWER_USER}:${FLOWER_PASSWORD:?set FLOWER_PASSWORD}"


def _commands(compose: dict[str, Any]) -> list[list[str]]:
    found = []
    for s in compose["services"].values():
        if s.get("image", "").startswith(("redis", "postgres")):
            continue
        found.append(s["command"])
        check = s.get("healthcheck", {}).get("test", [])
        if check[1:2] == ["accumsync"]:
            found.append(check[1:])
    return found


def test_every_command_is_one_the_tests_run(compose: dict[str, Any]) -> None:
    """Each command compose runs is run by the test-suite too, with a subset of its options."""
    for argv in _commands(compose):
        if argv[:2] == ["accumsync", "sandbox"]:
            continue  # below: the same Typer function the tests start as `python -m worker.sandbox`
        key = next((k for k in EXERCISED if tuple(argv[: len(k)]) == k), None)
        assert key is not None, f"compose runs {argv}, which no test runs"
        assert options(argv) <= options(EXERCISED[key]), (argv, EXERCISED[key])
    assert 'cli("db", "upgrade")' in (TESTS / "integration" / "conftest.py").read_text()


def test_sandbox_command_is_the_tested_one(compose: dict[str, Any]) -> None:
    """``accumsync sandbox`` is the function ``python -m worker.sandbox`` runs; options exist."""
    mounted = {c.name: c.callback for c in cli_app.registered_commands}
    assert mounted["sandbox"] is sandbox_command
    group: Any = typer.main.get_command(cli_app)
    declared = {o for p in group.commands["sandbox"].params for o in p.opts}
    assert options(compose["services"]["sandbox"]["command"]) <= declared


def test_healthcheck_urls_are_the_tested_ones(compose: dict[str, Any]) -> None:
    """The HTTP checks hit the paths the integration tests poll."""
    services = compose["services"]
    paths = {"sandbox": "/_admin/health", "flower": "/healthcheck", "metrics": "/metrics"}
    for name, path in paths.items():
        assert path in " ".join(services[name]["healthcheck"]["test"]), name
    sources = "".join(p.read_text() for p in (TESTS / "integration").glob("test_*.py"))
    sources += (ROOT / "worker" / "demo" / "sandboxes.py").read_text()
    assert all(path in sources for path in paths.values())


def test_dockerfile_builds_from_the_repo() -> None:
    """The image installs this checkout (not a registry copy) and copies every package."""
    text = (ROOT / "Dockerfile").read_text()
    assert "pip install ." in text
    for package in ("models", "tasks", "worker", "migrations"):
        assert f"COPY {package} {package}" in text


def _compose_cli() -> bool:
    if shutil.which("docker") is None:
        return False
    probe = subprocess.run(["docker", "compose", "version"], capture_output=True, check=False)
    return probe.returncode == 0


@pytest.mark.skipif(not _compose_cli(), reason="the docker compose plugin is not installed")
def test_docker_compose_config_accepts_it() -> None:
    """``docker compose config`` (no engine needed) parses and resolves the file."""
    env = os.environ | {"POSTGRES_PASSWORD": "p", "FLOWER_USER": "u", "FLOWER_PASSWORD": "p"}
    proc = subprocess.run(
        ["docker", "compose", "-f", str(COMPOSE), "config", "-q"],
        env=env, capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
