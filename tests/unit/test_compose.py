"""compose.yaml checked without a Docker engine: structure, health checks, one beat, and only
commands the test-suite itself runs against real processes."""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import typer
import yaml

from tests.integration.test_flower import flower_argv
from tests.integration.test_ops_health import HEALTH
from tests.integration.test_ops_metrics import metrics_argv
from worker.cli import app as cli_app
from worker.demo.procs import beat_argv, dispatch_argv, worker_argv
from worker.sandbox.cli import sandbox as sandbox_command

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "compose.yaml"
WORKERS = ("worker-ingest", "worker-flush")
MONITORING = ("prometheus", "grafana")
SERVICES = {"redis", "postgres", "migrate", "sandbox", *WORKERS, "beat", "dispatcher", "flower"}
SERVICES |= {"metrics"}
SERVICES |= set(MONITORING)
APP_SERVICES = SERVICES - {"redis", "postgres", *MONITORING}
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
    ("accumsync", "db", "upgrade"): ["accumsync", "db", "upgrade"],  # test_ingest's stacks run it
    ("accumsync", "dispatch"): ["accumsync", *_tail(dispatch_argv(), "dispatch")],
}


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    return loaded


def options(argv: list[str]) -> set[str]:
    return {word.split("=")[0] for word in argv if word.startswith("-") and word != "-A"}


def test_services_and_redis_durability(compose: dict[str, Any]) -> None:
    """All eleven services, Grafana's only under its profile; Redis keeps an append-only file
    and never evicts queued messages."""
    services = compose["services"]
    assert set(services) == SERVICES
    profiled = {name: s["profiles"] for name, s in services.items() if "profiles" in s}
    assert profiled == {"grafana": ["grafana"]}
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
    for name in (*WORKERS, "beat", "dispatcher", "flower", "metrics"):
        deps = services[name]["depends_on"]
        assert deps["redis"]["condition"] == "service_healthy", name
        assert deps["postgres"]["condition"] == "service_healthy", name
        assert deps["migrate"]["condition"] == "service_completed_successfully", name
    assert services["worker-flush"]["depends_on"]["sandbox"]["condition"] == "service_healthy"
    assert services["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert services["migrate"]["restart"] == "no"
    for name in SERVICES - {"migrate", "beat", "dispatcher"}:  # health reports those two
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


def test_vba_secrets_are_files_every_accumsync_service_reads(compose: dict[str, Any]) -> None:
    """The VBA API key and password are file secrets (./secrets/, gitignored) mounted in every
    accumsync service and named by the _FILE variables both the settings and the sandbox read;
    never a value in the environment."""
    assert compose["secrets"] == {
        "vba_api_key": {"file": "./secrets/vba_api_key.txt"},
        "vba_password": {"file": "./secrets/vba_password.txt"},
    }
    for name in APP_SERVICES:
        service = compose["services"][name]
        env = service["environment"]
        assert sorted(service["secrets"]) == ["vba_api_key", "vba_password"], name
        assert env["ACCUMSYNC_VBA_API_KEY_FILE"] == "/run/secrets/vba_api_key", name
        assert env["ACCUMSYNC_VBA_PASSWORD_FILE"] == "/run/secrets/vba_password", name
        assert not {"ACCUMSYNC_VBA_API_KEY", "ACCUMSYNC_VBA_PASSWORD"} & set(env), name
    assert "secrets/" in (ROOT / ".gitignore").read_text().splitlines()
    group: Any = typer.main.get_command(cli_app)
    envvars = {p.name: p.envvar for p in group.commands["sandbox"].params}
    assert envvars["api_key_file"] == "ACCUMSYNC_VBA_API_KEY_FILE"
    assert envvars["password_file"] == "ACCUMSYNC_VBA_PASSWORD_FILE"
    sandbox = compose["services"]["sandbox"]["command"]
    assert not {"--api-key", "--password"} & set(sandbox)  # the files, not the well-known pair


def test_sandbox_and_metrics_bind_loopback_unless_told(compose: dict[str, Any]) -> None:
    """``accumsync sandbox`` and ``accumsync metrics`` bind 127.0.0.1 by default; compose tells
    them 0.0.0.0 inside their containers, publishes metrics on the host's loopback only and the
    sandbox not at all."""
    group: Any = typer.main.get_command(cli_app)
    for name in ("sandbox", "metrics"):
        host = next(p for p in group.commands[name].params if p.name == "host")
        assert host.default == "127.0.0.1", name
    assert compose["services"]["metrics"]["ports"] == ["127.0.0.1:9808:9808"]
    assert "ports" not in compose["services"]["sandbox"]


def _commands(compose: dict[str, Any]) -> list[list[str]]:
    found = []
    for s in compose["services"].values():
        if s["image"] != compose["x-accumsync"]["image"]:
            continue  # not ours: Redis, Postgres, Prometheus and Grafana (below) run their own
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
    assert 'cli("db", "upgrade")' in (TESTS / "integration" / "test_ingest.py").read_text()


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


def _mounts(service: dict[str, Any]) -> dict[str, Path]:
    """A service's bind mounts: its path in the container -> the file or directory here."""
    sources = (volume.split(":")[:2] for volume in service["volumes"])
    return {target: ROOT / source for source, target in sources if source.startswith("./")}


def test_prometheus_runs_the_checked_config(compose: dict[str, Any]) -> None:
    """Prometheus loads ops/prometheus/prometheus.yml and its rules (promtool checks both:
    tests/unit/test_alerts.py) and scrapes the metrics service at the port it serves."""
    services = compose["services"]
    prometheus = services["prometheus"]
    assert _mounts(prometheus) == {"/etc/prometheus": ROOT / "ops" / "prometheus"}
    flags = dict(word.split("=", 1) for word in prometheus["command"])
    assert flags["--config.file"] == "/etc/prometheus/prometheus.yml"
    config = yaml.safe_load((ROOT / "ops" / "prometheus" / "prometheus.yml").read_text())
    metrics = services["metrics"]["command"]
    statics = [static for job in config["scrape_configs"] for static in job["static_configs"]]
    targets = [target for static in statics for target in static["targets"]]
    assert targets == [f"metrics:{metrics[metrics.index('--port') + 1]}"]
    assert prometheus["image"].startswith("prom/prometheus:v")  # a pinned tag, never latest


def test_grafana_is_provisioned_with_the_dashboard(compose: dict[str, Any]) -> None:
    """Grafana's provisioning points at the mounted dashboard and at the prometheus service."""
    grafana = compose["services"]["grafana"]
    mounts = _mounts(grafana)
    provisioning = mounts["/etc/grafana/provisioning"]
    assert provisioning == ROOT / "ops" / "grafana" / "provisioning"
    providers = yaml.safe_load((provisioning / "dashboards" / "accumsync.yml").read_text())
    folder = providers["providers"][0]["options"]["path"]
    dashboards = {t: path for t, path in mounts.items() if t.startswith(folder + "/")}
    assert dashboards == {f"{folder}/accumsync.json": ROOT / "ops" / "grafana" / "accumsync.json"}
    sources = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())
    source = sources["datasources"][0]
    assert source["url"] == "http://prometheus:9090"
    assert "127.0.0.1:9090:9090" in compose["services"]["prometheus"]["ports"]
    panels = json.loads(dashboards[f"{folder}/accumsync.json"].read_text())["panels"]
    assert {p["datasource"]["uid"] for p in panels} == {source["uid"]}
    assert re.fullmatch(r"grafana/grafana:\d+\.\d+\.\d+", grafana["image"])


def test_one_worker_per_queue(compose: dict[str, Any]) -> None:
    """Ingest and flush have a worker each, on their own queue (the defaults' names)."""
    services = compose["services"]
    queues = {name: services[name]["command"][-1] for name in WORKERS}
    assert queues == {"worker-ingest": "accumsync", "worker-flush": "accumsync.flush"}
    assert all(services[name]["command"][-2] == "-Q" for name in WORKERS)


def test_dockerfile_builds_from_the_lock_and_the_repo() -> None:
    """The image installs every dependency from the hash-pinned lock, then this checkout (not a
    registry copy) without resolving again, with the flower extra compose asks for."""
    text = (ROOT / "Dockerfile").read_text()
    assert "pip install --require-hashes -r requirements.lock" in text
    assert 'pip install --no-deps ".[${EXTRAS}]"' in text
    for package in ("models", "tasks", "worker", "migrations"):
        assert f"COPY {package} {package}" in text
    assert yaml.safe_load(COMPOSE.read_text())["x-accumsync"]["build"]["args"]["EXTRAS"] == "flower"


#: The Compose Specification's JSON schema, as Debian's docker-compose (1.29) ships it.
COMPOSE_SPEC = Path("/usr/lib/python3/dist-packages/compose/config/compose_spec.json")
DOCKER_COMPOSE = shutil.which("docker-compose")
#: CI installs Debian's docker-compose (scripts/services.sh) and must not skip these checks.
REQUIRED = bool(os.environ.get("ACCUMSYNC_REQUIRE_COMPOSE"))
needs_compose = pytest.mark.skipif(
    not REQUIRED and not (DOCKER_COMPOSE and COMPOSE_SPEC.exists()),
    reason="Debian's docker-compose is not installed (scripts/services.sh installs it)",
)


def without_name(compose: dict[str, Any]) -> dict[str, Any]:
    """The file less its top-level ``name``, which postdates docker-compose 1.29 and its schema."""
    assert compose["name"] == "accumsync"
    return copy.deepcopy({k: v for k, v in compose.items() if k != "name"})


@needs_compose
def test_the_compose_spec_schema_accepts_it(compose: dict[str, Any]) -> None:
    """The Compose Specification's own JSON schema accepts the file, and refuses it once a
    service holds a key the spec does not know (the check can fail)."""
    schema = json.loads(COMPOSE_SPEC.read_text())
    validator = jsonschema.Draft201909Validator(schema)
    assert [e.message for e in validator.iter_errors(without_name(compose))] == []
    broken = without_name(compose)
    broken["services"]["beat"]["restartt"] = "always"
    assert any("restartt" in e.message for e in validator.iter_errors(broken))


@needs_compose
def test_docker_compose_config_resolves_it(compose: dict[str, Any], tmp_path: Path) -> None:
    """``docker-compose config`` (no engine needed) parses and resolves the file: anchors,
    merges, variables and the file secrets every accumsync service mounts."""
    path = tmp_path / "compose.yaml"
    path.write_text(yaml.safe_dump(without_name(compose), sort_keys=False))
    env = os.environ | {"POSTGRES_PASSWORD": "p", "FLOWER_USER": "u", "FLOWER_PASSWORD": "p"}
    assert DOCKER_COMPOSE is not None
    proc = subprocess.run(
        [DOCKER_COMPOSE, "-f", str(path), "config"],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    resolved = yaml.safe_load(proc.stdout)
    files = {name: s["file"] for name, s in resolved["secrets"].items()}
    assert files == {n: str(tmp_path / "secrets" / f"{n}.txt") for n in files} and len(files) == 2
    for name in APP_SERVICES:
        mounted = [s["source"] for s in resolved["services"][name]["secrets"]]
        assert sorted(mounted) == sorted(files), name


#: The test-suite's own servers for a machine with Docker (``make services-compose``).
TEST_COMPOSE = ROOT / "compose.test.yaml"


@pytest.fixture(scope="module")
def test_compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(TEST_COMPOSE.read_text())
    return loaded


def test_test_services_are_where_the_tests_look(test_compose: dict[str, Any]) -> None:
    """compose.test.yaml publishes Redis, PostgreSQL and RabbitMQ on loopback at the ports, and
    with the users, that tests/services.py connects to: no password for postgres, guest for
    RabbitMQ allowed from outside the container, healthy before ``--wait`` returns."""
    from urllib.parse import urlsplit

    from tests.services import AMQP_URL, PG_ADMIN, REDIS_URL

    services = test_compose["services"]
    assert set(services) == {"redis", "postgres", "rabbitmq"}
    for name, url in (("redis", REDIS_URL), ("postgres", PG_ADMIN), ("rabbitmq", AMQP_URL)):
        parts = urlsplit(url)
        assert parts.hostname == "127.0.0.1", name
        assert services[name]["ports"] == [f"127.0.0.1:{parts.port}:{parts.port}"], name
        assert services[name]["healthcheck"]["test"][0] == "CMD", name
    postgres = services["postgres"]["environment"]
    assert postgres["POSTGRES_USER"] == urlsplit(PG_ADMIN).username
    assert postgres["POSTGRES_HOST_AUTH_METHOD"] == "trust"
    assert urlsplit(AMQP_URL).username == "guest"
    rabbit = services["rabbitmq"]["environment"]["RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS"]
    assert rabbit == "-rabbit loopback_users []"
    assert all(":" in s["image"] and not s["image"].endswith(":latest") for s in services.values())


def test_make_services_compose_starts_them() -> None:
    """``make services-compose`` starts compose.test.yaml and waits for its health checks; ``make
    test SERVICES=services-compose`` runs the suite on them instead of scripts/services.sh."""
    makefile = (ROOT / "Makefile").read_text()
    target = makefile.split("\nservices-compose:\n", 1)[1].split("\n\n", 1)[0]
    assert target.strip() == "docker compose -f compose.test.yaml up -d --wait"
    assert "\nSERVICES ?= services\ntest: install $(SERVICES) lint\n" in makefile


@needs_compose
def test_the_compose_spec_schema_and_docker_compose_accept_the_test_services(
    test_compose: dict[str, Any], tmp_path: Path
) -> None:
    """The Compose Specification's schema accepts compose.test.yaml, and ``docker-compose
    config`` resolves it (no engine needed)."""
    assert test_compose["name"] == "accumsync-test"
    bare = {k: v for k, v in test_compose.items() if k != "name"}
    validator = jsonschema.Draft201909Validator(json.loads(COMPOSE_SPEC.read_text()))
    assert [e.message for e in validator.iter_errors(bare)] == []
    path = tmp_path / "compose.test.yaml"
    path.write_text(yaml.safe_dump(bare, sort_keys=False))
    assert DOCKER_COMPOSE is not None
    proc = subprocess.run(
        [DOCKER_COMPOSE, "-f", str(path), "config"], capture_output=True, text=True, check=False
    )
    assert proc.returncode == 0, proc.stderr
    resolved = yaml.safe_load(proc.stdout)["services"]
    assert resolved["postgres"]["ports"] == ["127.0.0.1:5432:5432/tcp"]
