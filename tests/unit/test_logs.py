"""Log lines: the text and JSON shapes operators and the tests read, a task's id on each line of
the task (and on no other), Celery's own lines rendered the same way."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator

import pytest

from worker import logs


class Lines(logging.Handler):
    def __init__(self, fmt: str) -> None:
        super().__init__()
        self.setFormatter(logs.formatter(fmt))
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


@pytest.fixture
def caught(request: pytest.FixtureRequest) -> Iterator[Lines]:
    handler = Lines(request.param)
    logger = logging.getLogger("accumsync.test")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logs.unbind_task()


@pytest.mark.parametrize("caught", ["text"], indirect=True)
def test_text_lines_keep_their_shape_and_name_the_task(caught: Lines) -> None:
    log = logs.Log("test")
    log.info("flush.sent", pair=7, items=3)
    logs.bind_task("6f1c0d5e-0000-4000-8000-000000000001", "accumsync.flush_pair")
    log.warning("flush.held", pair=7)
    logs.unbind_task()
    log.info("after")
    first, second, third = (line.split(" ", 1)[1] for line in caught.lines)
    assert first == "INFO    accumsync.test flush.sent pair=7 items=3"
    assert second.startswith("WARNING accumsync.test flush.held pair=7 ")
    assert "task=accumsync.flush_pair" in second
    assert "task_id=6f1c0d5e-0000-4000-8000-000000000001" in second
    assert third == "INFO    accumsync.test after"  # the task's context ends with the task


@pytest.mark.parametrize("caught", ["json"], indirect=True)
def test_json_lines_carry_fields_task_and_traceback(caught: Lines) -> None:
    logs.bind_task("t-1", "accumsync.ingest")
    try:
        raise ValueError("boom")
    except ValueError:
        logs.Log("test").error("ingest.crashed", exc=True, batch=3)
    line = json.loads(caught.lines[0])
    assert [line[k] for k in ("level", "logger", "event", "batch")] == [
        "error",
        "accumsync.test",
        "ingest.crashed",
        3,
    ]
    assert (line["task"], line["task_id"]) == ("accumsync.ingest", "t-1")
    assert "ValueError: boom" in line["exc"]


@pytest.mark.parametrize("caught", ["json"], indirect=True)
def test_a_foreign_line_is_rendered_too(caught: Lines) -> None:
    """Celery's own lines (plain stdlib records) in the same JSON shape, with the task."""
    logs.bind_task("t-2", "accumsync.flush_pair")
    logging.getLogger("accumsync.test").info("Task %s succeeded", "accumsync.flush_pair[t-2]")
    line = json.loads(caught.lines[0])
    assert line["event"] == "Task accumsync.flush_pair[t-2] succeeded"
    assert line["task_id"] == "t-2"
