"""ops/: the alert rules pass promtool's checks and its unit tests (each alert fires, then
clears), they use the health check's thresholds, and every metric an alert or the Grafana
dashboard names is one ``accumsync metrics`` serves."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml
from sqlmodel import Session

from models.tables import BeatTick
from worker.db import make_engine
from worker.ingest.store import IngestCounts, record_batch
from worker.settings import Settings
from worker.store import counters

ROOT = Path(__file__).resolve().parents[2]
PROMETHEUS = ROOT / "ops" / "prometheus"
DASHBOARD = ROOT / "ops" / "grafana" / "accumsync.json"
ACCUMSYNC = str(Path(sys.executable).with_name("accumsync"))

PROMTOOL = shutil.which("promtool")
#: CI installs Debian's prometheus package for promtool (scripts/services.sh) and must not skip.
REQUIRED = bool(os.environ.get("ACCUMSYNC_REQUIRE_COMPOSE"))
needs_promtool = pytest.mark.skipif(
    not REQUIRED and PROMTOOL is None,
    reason="promtool is not installed (scripts/services.sh installs Debian's prometheus)",
)


def promtool(*args: str, cwd: Path = PROMETHEUS) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL is not None, "promtool is missing: scripts/services.sh installs it"
    return subprocess.run(
        [PROMTOOL, *args], cwd=cwd, capture_output=True, text=True, check=False, timeout=120
    )


def rules() -> dict[str, dict[str, Any]]:
    """alerts.yml's rules by alert name."""
    groups = yaml.safe_load((PROMETHEUS / "alerts.yml").read_text())["groups"]
    return {rule["alert"]: rule for group in groups for rule in group["rules"]}


@needs_promtool
def test_rules_and_the_scrape_config_pass_promtool_check() -> None:
    """``promtool check rules`` and ``check config`` (which loads the rules too) accept them."""
    for args in (("check", "rules", "alerts.yml"), ("check", "config", "prometheus.yml")):
        proc = promtool(*args)
        assert proc.returncode == 0, proc.stdout + proc.stderr


@needs_promtool
def test_every_alert_fires_and_clears_in_promtool_unit_tests() -> None:
    """``promtool test rules alerts_test.yml`` passes: each alert on its input series."""
    proc = promtool("test", "rules", "alerts_test.yml")
    assert proc.returncode == 0, proc.stdout + proc.stderr


@needs_promtool
def test_a_broken_rule_fails_its_unit_test(tmp_path: Path) -> None:
    """The unit tests can fail: with one threshold moved, promtool names that alert."""
    broken = (PROMETHEUS / "alerts.yml").read_text()
    rule = "expr: min(accumsync_oldest_dirty_age_seconds) > 900"
    assert broken.count(rule) == 1
    (tmp_path / "alerts.yml").write_text(broken.replace(rule, rule + "0"))
    shutil.copy(PROMETHEUS / "alerts_test.yml", tmp_path)
    proc = promtool("test", "rules", "alerts_test.yml", cwd=tmp_path)
    assert proc.returncode != 0
    assert "alertname: AccumsyncOldestDirtyTooOld" in proc.stdout + proc.stderr


def _minutes(duration: str) -> float:
    units = {"s": 1 / 60, "m": 1, "h": 60}
    return sum(float(n) * units[u] for n, u in re.findall(r"(\d+)([smh])", duration))


def test_every_alert_is_tested_firing_then_cleared() -> None:
    """alerts_test.yml has, for each rule, a time it fires and a later time it is clear."""
    cases = yaml.safe_load((PROMETHEUS / "alerts_test.yml").read_text())["tests"]
    checks = [check for case in cases for check in case["alert_rule_test"]]
    for name in rules():
        mine = [c for c in checks if c["alertname"] == name]
        fired = [_minutes(c["eval_time"]) for c in mine if c["exp_alerts"]]
        clear = [_minutes(c["eval_time"]) for c in mine if not c["exp_alerts"]]
        assert fired, f"{name} is never tested firing"
        assert any(t > min(fired) for t in clear), f"{name} is never tested clearing"


def test_every_alert_says_how_bad_and_what_to_run() -> None:
    """Each rule waits (``for:``), has a severity, and tells the operator an accumsync command
    or the setting to fix."""
    for name, rule in rules().items():
        assert _minutes(rule["for"]) >= 1, name
        assert rule["labels"]["severity"] in {"critical", "warning"}, name
        assert rule["annotations"]["summary"], name
        assert "`accumsync " in rule["annotations"]["description"], name


def test_thresholds_are_the_health_check_defaults() -> None:
    """Alerts and ``accumsync health`` judge by the same limits (worker/settings.py)."""
    defaults = {name: field.default for name, field in Settings.model_fields.items()}
    judged = {
        "AccumsyncConsumerStalled": f"> {defaults['health_max_idle']:g}",
        "AccumsyncOldestDirtyTooOld": f"> {defaults['health_max_dirty_age']:g}",
        "AccumsyncNoSuccessfulFlush": f"> {defaults['health_max_flush_age']:g}",
        "AccumsyncVbaForbidden": f"[{defaults['health_max_flush_age'] / 60:g}m]",
    }
    found = rules()
    for name, threshold in judged.items():
        assert threshold in found[name]["expr"], (name, threshold)


def test_the_exporter_alert_watches_the_scrape_job() -> None:
    """``up`` is read for the job prometheus.yml scrapes ``accumsync metrics`` as."""
    config = yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text())
    jobs = [job["job_name"] for job in config["scrape_configs"]]
    assert config["rule_files"] == ["alerts.yml"]
    assert rules()["AccumsyncMetricsDown"]["expr"] == f'up{{job="{jobs[0]}"}} == 0'
    assert jobs == ["accumsync"]


# --- metric names -----------------------------------------------------------------------------

#: PromQL's functions, aggregations and keywords, and Prometheus's own ``up``.
PROMQL = {
    "abs",
    "absent",
    "absent_over_time",
    "avg",
    "avg_over_time",
    "bool",
    "by",
    "ceil",
    "changes",
    "clamp_min",
    "count",
    "count_over_time",
    "delta",
    "deriv",
    "floor",
    "group_left",
    "group_right",
    "histogram_quantile",
    "idelta",
    "ignoring",
    "increase",
    "irate",
    "last_over_time",
    "max",
    "max_over_time",
    "min",
    "min_over_time",
    "offset",
    "on",
    "or",
    "and",
    "unless",
    "predict_linear",
    "rate",
    "resets",
    "round",
    "sum",
    "sum_over_time",
    "time",
    "topk",
    "vector",
    "without",
    "up",
}


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression reads: identifiers less label matchers and label
    lists, ranges, strings, Grafana's ``$variables`` and PromQL's own words."""
    expr = re.sub(r'"[^"]*"', "", expr)
    expr = re.sub(r"\{[^}]*\}|\[[^\]]*\]|\$\w+", "", expr)
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", expr)
    return set(re.findall(r"(?<![\w:.])[a-zA-Z_:][\w:]*", expr)) - PROMQL


def test_the_name_reader_finds_metrics_and_skips_promql() -> None:
    """The reader below is right on a query with every construct the files use."""
    expr = (
        'max by (queue) (rate(accumsync_x_total{outcome=~"ok|p"}[$__rate_interval])) * 60 > 1 '
        "and on () (min(accumsync_y) > 300 or on () absent(accumsync_z)) unless up offset 10m"
    )
    assert metric_names(expr) == {"accumsync_x_total", "accumsync_y", "accumsync_z"}


def queries() -> dict[str, str]:
    """Every PromQL expression of the alerts and the dashboard, by where it is."""
    found = {f"alert {name}": rule["expr"] for name, rule in rules().items()}
    for panel in json.loads(DASHBOARD.read_text())["panels"]:
        for target in panel["targets"]:
            found[f"panel {panel['title']!r} {target['refId']}"] = target["expr"]
    return found


def _accumsync(env: dict[str, str], *args: str) -> str:
    proc = subprocess.run(
        [ACCUMSYNC, *args], env=env, capture_output=True, text=True, check=True, timeout=120
    )
    return proc.stdout


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> set[str]:
    """Sample names ``accumsync metrics --once`` prints for a migrated SQLite store holding an
    ingested batch, a successful batch call and a beat tick (the ages and call counts need
    one)."""
    home = tmp_path_factory.mktemp("home")
    env = {k: v for k, v in os.environ.items() if not k.startswith("ACCUMSYNC_")}
    env["ACCUMSYNC_HOME"] = str(home)
    _accumsync(env, "db", "upgrade")
    started = datetime.now(UTC) - timedelta(minutes=3)
    engine = make_engine(f"sqlite:///{home / 'accumsync.db'}")
    with Session(engine) as session:
        record_batch(session, IngestCounts(received=2, applied=2), started, time.perf_counter())
        counters.add(session, {"calls.ok.207": 1, "items.200": 2})  # as a flush's audit adds
        session.add(BeatTick(beat="host:1", first_at=started, last_at=started, ticks=1))
        session.commit()
    engine.dispose()
    text = _accumsync(env, "metrics", "--once")
    return {line.split("{")[0].split()[0] for line in text.splitlines() if line[:1].isalpha()}


def test_the_store_answers_with_every_family(served: set[str]) -> None:
    """The fixture's scrape saw a store and a broker that answered, ages included."""
    assert {"accumsync_store_up", "accumsync_broker_up", "accumsync_queue_length"} <= served
    assert {"accumsync_last_flush_age_seconds", "accumsync_last_progress_age_seconds"} <= served


def test_every_metric_queried_is_one_accumsync_serves(served: set[str]) -> None:
    """No alert or panel reads a name ``accumsync metrics`` does not serve (counters with their
    ``_total``): a renamed metric breaks this test, not a silent alert."""
    unknown = {
        where: sorted(names - served)
        for where, expr in queries().items()
        if (names := metric_names(expr)) - served
    }
    assert unknown == {}
    assert all(metric_names(expr) for expr in queries().values() if "up{" not in expr)
