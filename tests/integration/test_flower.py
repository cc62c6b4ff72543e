"""Flower against a real worker: every accumsync task is visible, no member data or secret is.

Flower runs as compose runs it (``celery -A worker flower``, basic auth from FLOWER_BASIC_AUTH),
on Redis, beside a worker on Postgres flushing to the sandbox over HTTP.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.stack import Stack
from worker.demo.procs import CELERY, Child, wait_for
from worker.demo.sandboxes import SandboxHandle, free_port, running_sandbox
from worker.demo.streams import StreamSpec, generate
from worker.sandbox import config as sandbox_config

pytestmark = pytest.mark.integration

TASKS = {"accumsync.ingest", "accumsync.flush_due", "accumsync.flush_pair"}
# Flower shows every worker's events on its broker's database, and the suite's other stacks share
# database 0 (their queues are their own, Celery's event fanout is not): this one has its own.
FLOWER_REDIS_DB = 9
AUTH = ("ops", "flower-test-password")


def flower_argv(port: int) -> list[str]:
    """The Flower command the compose file runs (its port and address aside)."""
    return [*CELERY, "flower", f"--port={port}", "--address=127.0.0.1"]


@pytest.fixture
def sandbox() -> Iterator[SandboxHandle]:
    """A sandbox that fails some 207 items, so retries show up in Flower too."""
    with running_sandbox(item_error_rate=0.1, seed=3) as handle:
        yield handle


def member_data(events: list[dict[str, Any]]) -> set[str]:
    """Every subscriber id, group id and amount (>= 100.00) in ``events``."""
    values: set[str] = set()
    for e in events:
        values.update({str(e["subscriber_id"]), str(e["group_id"])})
        amounts = e.get("amounts")
        if isinstance(amounts, dict):
            values.update(str(a) for a in amounts.values() if len(str(a)) >= 6)
    return values


def tokens(text: str) -> set[str]:
    """Words and whole decimal numbers of ``text``; a timestamp's digits and the task runtimes
    Flower renders (``133.16 ms``) are not amounts, however alike they look."""
    text = re.sub(r"\d+\.\d+ ms\b", "", text)
    return set(re.findall(r"\w+", text)) | set(re.findall(r"(?<![\d.])\d+\.\d+(?![\d.])", text))


def test_flower_shows_every_task_and_no_member_data(
    make_stack: Callable[..., Stack],
    redis_url: str,
    pg_url: str,
    sandbox: SandboxHandle,
    tmp_path: Path,
) -> None:
    """Flower lists ingest, flush_due and flush_pair; no id, amount or secret in any answer."""
    stack = make_stack(
        database_url=pg_url,
        broker_url=redis_url.rsplit("/", 1)[0] + f"/{FLOWER_REDIS_DB}",
        flush_interval="1",
        backoff_base="0.1",
        backoff_max="1",
        max_attempts="100",
    )
    stack.use_sandbox(sandbox.env())
    stack.migrate()
    port = free_port()
    env = stack.env | {"FLOWER_BASIC_AUTH": ":".join(AUTH)}
    flower = Child("flower", flower_argv(port), env, tmp_path / "flower.log").start()
    stack.children.append(flower)
    url = f"http://127.0.0.1:{port}"
    http = httpx.Client(base_url=url, auth=AUTH, timeout=10)
    stack_closes(stack, http)
    assert wait_for(lambda: _answers(http, "/healthcheck"), 60, 0.3), flower.output()[-2000:]
    assert httpx.get(url + "/api/tasks", timeout=5).status_code == 401  # basic auth holds

    stack.worker("w1", concurrency=2)
    events = generate(StreamSpec(events=600, members=12, invalid=6, seed=31))
    path = tmp_path / "events.jsonl"
    path.write_text("".join(json.dumps(e) + "\n" for e in events))
    stack.cli("publish", str(path), "--batch-size", "200")
    stack.cli("flush", "--wait", "--timeout", "120")

    def seen() -> dict[str, Any]:
        tasks: dict[str, Any] = http.get("/api/tasks").json()
        return tasks

    assert wait_for(lambda: {t["name"] for t in seen().values()} >= TASKS, 30, 0.5)
    tasks = seen()
    answers = [json.dumps(tasks), http.get("/api/workers", params={"refresh": "1"}).text]
    answers.append(http.get("/api/task/types").text)
    for task_id, task in tasks.items():
        # None: Flower saw this task's later events only (its name comes with sent/received).
        assert task["name"] in TASKS | {None}
        answers.append(http.get(f"/api/task/info/{task_id}").text)
        page = http.get(f"/task/{task_id}")
        assert page.status_code == 200
        answers.append(page.text)
    everything = "\n".join(answers)
    assert member_data(events) <= tokens(json.dumps(events))  # the detector does see them
    leaks = sorted(member_data(events) & tokens(everything))
    assert leaks == [], f"member data in Flower: {leaks[:5]}"
    secrets = (sandbox_config.PASSWORD, sandbox_config.API_KEY, AUTH[1])
    assert [s for s in secrets if s in everything] == []
    ingest = [t for t in tasks.values() if t["name"] == "accumsync.ingest"]
    assert all(re.fullmatch(r"\(\d+ events [\w.-]+\.\.[\w.-]+\)", t["args"]) for t in ingest)


def stack_closes(stack: Stack, http: httpx.Client) -> None:
    """Close ``http`` when the stack closes (no socket left for the ResourceWarning check)."""
    close = stack.close

    def both() -> None:
        http.close()
        close()

    stack.close = both  # type: ignore[method-assign]


def _answers(http: httpx.Client, path: str) -> bool:
    try:
        return http.get(path).status_code == 200
    except httpx.TransportError:
        return False
