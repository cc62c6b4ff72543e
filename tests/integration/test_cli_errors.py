"""Every command, facing an unmigrated store, an unreachable store or broker, or an invalid setting,
says in one or two lines what is wrong and how to fix it (the setting, the host:port, the command
to run) and exits 4 (docs/cli.md); no traceback unless ``--debug``.

Each command runs as a new user would run it: the installed ``accumsync`` script in a fresh
process, with a fresh home. The runs are started together (they are a second each) and each case
then checks its own.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import astuple, dataclass
from pathlib import Path

import pytest

ACCUMSYNC = str(Path(sys.executable).with_name("accumsync"))
DOWN_STORE = "postgresql+psycopg://postgres:s3cret-pw@127.0.0.1:1/test"
DOWN_BROKER = "redis://:s3cret-pw@127.0.0.1:1/0"
FAULTS = ("unmigrated", "store_down", "broker_down", "bad_setting")

UPGRADE = "run `accumsync db upgrade`"
STORE = ("127.0.0.1:1", "ACCUMSYNC_DATABASE_URL")
BROKER = ("127.0.0.1:1", "ACCUMSYNC_BROKER_URL")
SETTING = ("ACCUMSYNC_VBA_BATCH_MAX", "valid integer")


@dataclass(frozen=True)
class Expect:
    code: int
    says: tuple[str, ...] = ()


OK = Expect(0)
# command -> fault -> what it must do. A command that does not need the faulty part works.
CASES: dict[str, dict[str, Expect]] = {
    "status": {
        "unmigrated": Expect(4, (UPGRADE,)),
        "store_down": Expect(4, STORE),
        "broker_down": OK,
    },
    "db check": {
        "unmigrated": Expect(4, (UPGRADE,)),
        "store_down": Expect(4, STORE),
        "broker_down": OK,
    },
    "db upgrade": {"unmigrated": OK, "store_down": Expect(4, STORE), "broker_down": OK},
    "publish {events}": {
        "unmigrated": OK,  # queued: workers refuse to start until the store is migrated
        "store_down": OK,
        "broker_down": Expect(4, BROKER),
    },
    "dead-letters list": {
        "unmigrated": Expect(4, (UPGRADE,)),
        "store_down": Expect(4, STORE),
        "broker_down": OK,
    },
    "dead-letters replay --all": {
        "unmigrated": Expect(4, (UPGRADE,)),
        "store_down": Expect(4, STORE),
        "broker_down": OK,  # nothing to re-publish
    },
    "dead-letters resolve 1 --landed": {
        "unmigrated": Expect(4, (UPGRADE,)),
        "store_down": Expect(4, STORE),
        "broker_down": Expect(1, ("not a hold",)),  # no such letter: not a fault of the broker
    },
    "flush": {
        "unmigrated": Expect(4, (UPGRADE,)),
        "store_down": Expect(4, STORE),
        "broker_down": Expect(4, BROKER),
    },
    "plans push {plans}": {
        "unmigrated": Expect(4, (UPGRADE,)),
        "store_down": Expect(4, STORE),
        "broker_down": Expect(4, BROKER),  # the shared rate limit lives on the broker's Redis
    },
    # health's job is to report these: exit 1 (unhealthy) with the same named reasons.
    "health --samples 1 --interval 0": {
        "unmigrated": Expect(1, (UPGRADE,)),
        "store_down": Expect(1, STORE),
        "broker_down": Expect(1, BROKER),
    },
    # metrics' job is to go on serving: the parts that do not answer read 0.
    "metrics --once": {
        "unmigrated": Expect(0, ("accumsync_store_up 0.0",)),
        "store_down": Expect(0, ("accumsync_store_up 0.0",)),
        "broker_down": Expect(0, ("accumsync_broker_up 0.0",)),
    },
    # The demo keeps its own store and broker unless told: the faults come as its options.
    "demo --events 100 --members 5 --timeout 60 {demo_fault}": {
        "store_down": Expect(4, STORE),
        "broker_down": Expect(4, ("127.0.0.1:1",)),
    },
    "schema": {"unmigrated": OK, "store_down": OK, "broker_down": OK},
}
for _faults in CASES.values():
    _faults.setdefault("bad_setting", Expect(4, SETTING))
CASES["schema"]["bad_setting"] = OK  # it reads no setting
# The demo runs on settings of its own and ignores the user's ACCUMSYNC_* (worker/demo/demo.py):
# a bad one is no fault of its (a whole demo run would only prove that again: test_ops_demo).
del CASES["demo --events 100 --members 5 --timeout 60 {demo_fault}"]["bad_setting"]


@dataclass(frozen=True)
class Ran:
    code: int
    stdout: str
    stderr: str


def _env(fault: str, home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ACCUMSYNC_")}
    env.update(ACCUMSYNC_HOME=str(home), ACCUMSYNC_VBA_BASE_URL="http://127.0.0.1:9")
    env.update(COLUMNS="200")
    if fault == "store_down":
        env["ACCUMSYNC_DATABASE_URL"] = DOWN_STORE
    elif fault == "broker_down":
        env["ACCUMSYNC_BROKER_URL"] = DOWN_BROKER
    elif fault == "bad_setting":
        env["ACCUMSYNC_VBA_BATCH_MAX"] = "abc"
    return env


def _run(command: str, fault: str, root: Path) -> Ran:
    home = root / f"{fault}-{abs(hash(command))}"
    home.mkdir()
    env = _env(fault, home)
    if fault in ("broker_down", "bad_setting"):  # a store that is there and current
        shutil.copy(root / "migrated" / "accumsync.db", home / "accumsync.db")
    (home / "events.jsonl").write_text('{"event_id": "e-1"}\n')
    (home / "plans.yaml").write_text("- {plan_ID: P1, accum_Name: RXDED, member_Deductible: 5}\n")
    demo_fault = {
        "store_down": f"--database-url {DOWN_STORE}",
        "broker_down": f"--broker-url {DOWN_BROKER}",
    }.get(fault, "")
    argv = command.format(
        events=home / "events.jsonl", plans=home / "plans.yaml", demo_fault=demo_fault
    ).split()
    done = subprocess.run(
        [ACCUMSYNC, *argv],
        env=env,
        cwd=home,
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        timeout=120,
    )
    return Ran(done.returncode, done.stdout, done.stderr)


PAIRS = [(command, fault) for command, faults in CASES.items() for fault in faults]


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, str], Ran]:
    """Every (command, fault) run once per test session: the module has a lane of its own
    (tests/conftest.py), and should its tests be spread over lanes (another --dist), the first
    lane to get here runs them, under a lock, and the others read what it saved."""
    shared = tmp_path_factory.getbasetemp().parent  # one folder for every lane of this run
    saved = shared / "cli-errors.json"
    with (shared / "cli-errors.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not saved.exists():
            runs = _run_all(tmp_path_factory.mktemp("cli-errors"))
            rows = [[command, fault, *astuple(ran)] for (command, fault), ran in runs.items()]
            saved.write_text(json.dumps(rows))
    rows = json.loads(saved.read_text())
    return {(command, fault): Ran(*ran) for command, fault, *ran in rows}


def _run_all(root: Path) -> dict[tuple[str, str], Ran]:
    (root / "migrated").mkdir()
    env = _env("", root / "migrated")
    subprocess.run([ACCUMSYNC, "db", "upgrade"], env=env, check=True, capture_output=True)
    with ThreadPoolExecutor(max_workers=4) as pool:
        futures = {pair: pool.submit(_run, *pair, root) for pair in PAIRS}
        return {pair: future.result() for pair, future in futures.items()}


def _id(command: str, fault: str) -> str:
    words = [w for w in command.split()[:2] if not w.startswith(("{", "-"))]
    return "-".join([*words, fault])


@pytest.mark.parametrize(("command", "fault"), PAIRS, ids=[_id(*pair) for pair in PAIRS])
def test_each_command_names_the_problem_and_the_fix(
    results: dict[tuple[str, str], Ran], command: str, fault: str
) -> None:
    ran, expect = results[(command, fault)], CASES[command][fault]
    both = ran.stdout + ran.stderr
    assert ran.code == expect.code, both[-2000:]
    assert "Traceback" not in both
    assert "s3cret-pw" not in both, "a password was printed"
    flat = " ".join(both.split())  # a long line may wrap on the terminal's width
    for words in expect.says:
        assert words in flat, both[-2000:]
    if expect.code == 4:  # accumsync cannot work here: a line or two that name the fix
        lines = [line for line in ran.stderr.splitlines() if line.strip()]
        problem = [line for line in lines if not line.startswith(("home ", "store migrated"))]
        assert 1 <= len(problem) <= 2, ran.stderr


def test_debug_shows_the_traceback(tmp_path: Path) -> None:
    env = _env("bad_setting", tmp_path)
    done = subprocess.run(
        [ACCUMSYNC, "--debug", "status"], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 1
    assert "Traceback" in done.stderr
    assert "vba_batch_max" in done.stderr


USAGE = [
    ("publish /nonexistent.jsonl", "cannot read /nonexistent.jsonl: No such file or directory"),
    ("plans push /nonexistent.yaml", "cannot read /nonexistent.yaml: No such file or directory"),
    ("reconcile --pairs /nonexistent.csv", "cannot read /nonexistent.csv"),
    ("reconcile --all --csv /nonexistent/dir/out.csv", "cannot write /nonexistent/dir/out.csv"),
    ("dead-letters list --source ingset", "'ingset' is not one of"),
    ("dead-letters replay", "name letters with --id N"),
]


@pytest.mark.parametrize(("command", "says"), USAGE, ids=[c for c, _ in USAGE])
def test_a_usage_error_exits_2_and_says_so_briefly(tmp_path: Path, command: str, says: str) -> None:
    """A file that can't be read or written, an unknown --source: exit 2, a few lines at most,
    no traceback (a missing file printed a 42-line traceback before)."""
    argv = [ACCUMSYNC, *command.split()]
    env = _env("", tmp_path)
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done.stdout + done.stderr
    assert says in " ".join(done.stderr.split())
    assert "Traceback" not in done.stderr
    assert len(done.stderr.splitlines()) <= 6, done.stderr  # click's usage box at most


def test_version_and_short_help(tmp_path: Path) -> None:
    from importlib.metadata import version

    env = _env("", tmp_path)
    shown = subprocess.run([ACCUMSYNC, "--version"], env=env, capture_output=True, text=True)
    assert (shown.returncode, shown.stdout.strip()) == (0, f"accumsync {version('accumsync')}")
    argv = [ACCUMSYNC, "plans", "push", "-h"]
    helped = subprocess.run(argv, env=env, capture_output=True, text=True)
    assert helped.returncode == 0 and "--json" in helped.stdout
    panels = subprocess.run([ACCUMSYNC, "-h"], env=env, capture_output=True, text=True).stdout
    heads = [p for p in ("Run", "Inspect", "Repair", "Develop") if f"─ {p} ─" in panels]
    assert heads == ["Run", "Inspect", "Repair", "Develop"]
