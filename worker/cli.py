"""``accumsync``: the command line an operator drives the worker with."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from enum import IntEnum, StrEnum
from pathlib import Path
from typing import Annotated, Any, TextIO

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

app = typer.Typer(
    help="accumsync: claim events in, exact VBA accumulators out.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,  # rich tracebacks print locals: secrets, member data
    context_settings={"help_option_names": ["-h", "--help"]},  # the subcommands inherit it
)
db_app = typer.Typer(help="The store's schema.", no_args_is_help=True)
dead_app = typer.Typer(help="Events and items that were refused, with their reasons.")
plans_app = typer.Typer(help="Plan accumulator definitions (PUT /plans/{id}/accumulators-batch).")
#: The help's panels: running the pipeline, looking at it, putting things right, developing.
RUN, INSPECT, REPAIR, DEVELOP = "Run", "Inspect", "Repair", "Develop"
app.add_typer(db_app, name="db", rich_help_panel=RUN)
app.add_typer(dead_app, name="dead-letters", rich_help_panel=REPAIR)
app.add_typer(plans_app, name="plans", rich_help_panel=RUN)
out = Console()
err = Console(stderr=True)

JsonFlag = Annotated[bool, typer.Option("--json", help="machine-readable output")]
_debug = {"on": False}


class Code(IntEnum):
    """Every command's exit codes (docs/cli.md has the table)."""

    OK = 0
    #: The command ran and found what it reports: drift, unhealthy, dead letters, refusals.
    FOUND = 1
    #: The command line or its input: a bad option, an unreadable file, a bad plan file.
    USAGE = 2
    #: ``flush --wait``: accumulators still waiting at the timeout.
    PENDING = 3
    #: accumsync cannot work here: a setting, the store or broker unreachable or full, the
    #: store's schema not current, VBA unreachable.
    ENVIRONMENT = 4
    INTERRUPTED = 130


class Source(StrEnum):
    """Where a dead letter came from."""

    ingest = "ingest"
    flush = "flush"
    plans = "plans"
    broker = "broker"


def _version(show: bool) -> None:
    if show:
        from importlib.metadata import version

        out.print(f"accumsync {version('accumsync')}")
        raise typer.Exit()


def _readable(path: Path) -> Path:
    """A file named on the command line, if it can be read; otherwise one line and exit 2."""
    try:
        with path.open("rb"):
            pass
    except OSError as exc:
        sys.stderr.write(f"accumsync: cannot read {path}: {exc.strerror or exc}\n")
        raise typer.Exit(Code.USAGE) from None
    return path


def _writable(path: Path) -> Path:
    """A file the command will write, if it can be; otherwise one line and exit 2 (before any
    work is done)."""
    try:
        with path.open("a"):
            pass
    except OSError as exc:
        sys.stderr.write(f"accumsync: cannot write {path}: {exc.strerror or exc}\n")
        raise typer.Exit(Code.USAGE) from None
    return path


@app.callback()
def _options(
    debug: Annotated[
        bool,
        typer.Option(
            "--debug",
            envvar="ACCUMSYNC_DEBUG",
            help="show the whole traceback of a configuration or connection problem",
        ),
    ] = False,
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_version, is_eager=True, help="print the version and exit"
        ),
    ] = False,
) -> None:
    _debug["on"] = debug
    _log_lines()


def _log_lines() -> None:
    """accumsync's log lines in the configured format; with settings that don't validate, the
    default one (a command that needs them names the bad setting; ``schema`` does not need them)."""
    from pydantic import ValidationError

    from worker import logs
    from worker.settings import get_settings

    try:
        settings = get_settings()
    except ValidationError:
        logs.configure()
        return
    logs.configure(settings.log_format, settings.log_level)


def _require_store() -> None:
    """Stop here, naming the fix, unless the store answers and its schema is current."""
    from worker.db import check_migrated

    check_migrated()


def _exit_if_interrupted(exc: BaseException, then: str) -> None:
    """Exit 130 with ``interrupted: <then>`` when ``exc`` is Ctrl-C, or carries it in its chain
    (a store round trip cut short by it); return otherwise, for the caller's own handling."""
    from worker.problems import interrupted

    if interrupted(exc):
        err.print(f"interrupted: {then}")
        raise typer.Exit(Code.INTERRUPTED) from None


@db_app.command("upgrade")
def db_upgrade() -> None:
    """Create or migrate the store's tables to the latest schema."""
    from worker.db import upgrade

    upgrade()
    out.print("[green]database is at the latest schema[/green]")


@db_app.command("check")
def db_check() -> None:
    """Exit 0 when the store's schema is current; 4, naming the fix, when it is not."""
    _require_store()
    out.print("database schema is current")


def read_lines(stream: TextIO) -> Iterator[Any]:
    """Each non-blank JSONL line as an object; a line that is not JSON passes as text, so the
    worker dead-letters it with the parse error instead of it vanishing here."""
    for line in stream:
        if line := line.strip():
            try:
                yield json.loads(line)
            except ValueError:
                yield line


def _count_lines(path: Path) -> int | None:
    with path.open("rb") as f:
        return sum(1 for line in f if line.strip())


@contextmanager
def _full_broker_exits() -> Iterator[None]:
    """A broker out of memory refusing a message: its one line (what was queued, what to do)
    and exit 4, not a traceback."""
    from worker.ingest.producer import BrokerFull

    try:
        yield
    except BrokerFull as exc:
        if _debug["on"]:
            raise
        sys.stderr.write(f"{exc}\n")
        raise typer.Exit(Code.ENVIRONMENT) from None


@app.command(rich_help_panel=RUN)
def publish(
    file: Annotated[str, typer.Argument(help="a JSONL file of ClaimEvent v1, or - for stdin")],
    batch_size: Annotated[
        int | None,
        typer.Option(
            min=1, max=50_000, help="events per message [default: ACCUMSYNC_INGEST_BATCH_SIZE]"
        ),
    ] = None,
    confirm: Annotated[
        bool,
        typer.Option(
            "--confirm",
            help="wait until the ledger has recorded every event, publishing the missing ones "
            "again (an event counts once); exit 1 if some are not recorded in the end",
        ),
    ] = False,
    within: Annotated[
        float,
        typer.Option(
            min=1,
            help="--confirm: seconds without a new receipt before the missing events are "
            "published again (three publishes at most)",
        ),
    ] = 60.0,
    as_json: JsonFlag = False,
) -> None:
    """Publish ClaimEvent v1 lines to the ingest queue, in batches; exit 4 if the broker is
    unreachable or full (the line says how many were queued)."""
    from worker.ingest.producer import connect
    from worker.ingest.producer import publish as send
    from worker.settings import get_settings

    if file != "-":
        _readable(Path(file))
    connect()  # an unreachable broker is said before a progress bar starts
    if confirm:
        _require_store()
    batch_size = batch_size or get_settings().ingest_batch_size
    total = None if file == "-" else _count_lines(Path(file))
    stream = sys.stdin if file == "-" else Path(file).open(encoding="utf-8")  # noqa: SIM115
    if confirm:
        with _full_broker_exits(), stream:
            _publish_confirmed(list(read_lines(stream)), batch_size, within, as_json)
        return
    columns = (TextColumn("publishing"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    progress = Progress(*columns, console=err, transient=False)
    with _full_broker_exits(), stream, progress:
        task = progress.add_task("publish", total=total)
        sent = send(read_lines(stream), batch_size, on_batch=lambda n: progress.advance(task, n))
    if as_json:
        out.print_json(json.dumps({"published": sent, "batch_size": batch_size}))
        return
    out.print(f"published {sent} events in batches of {batch_size}")


def _publish_confirmed(events: list[Any], batch_size: int, within: float, as_json: bool) -> None:
    from worker.ingest.receipts import publish_confirmed

    def said(round_: int, sent: int) -> None:
        verb = "published" if round_ == 1 else f"round {round_}: published again"
        err.print(f"{verb} {sent} events in batches of {batch_size}; waiting for their receipts")

    done = publish_confirmed(events, within=within, batch_size=batch_size, on_round=said)
    if as_json:
        out.print_json(json.dumps(done.as_json()))
    else:
        rounds = len(done.sent)
        out.print(f"published {sum(done.sent)} events in {rounds} round(s), {done.waited:.1f} s")
        _print_receipts(done.receipts)
    if not done.receipts.complete:
        raise typer.Exit(Code.FOUND)


@app.command(rich_help_panel=INSPECT)
def receipts(
    file: Annotated[str, typer.Argument(help="a JSONL file of ClaimEvent v1, or - for stdin")],
    as_json: JsonFlag = False,
) -> None:
    """Which events of a ClaimEvent stream the ledger has not recorded: missing (publish them
    again: an event counts once) or refused (dead letters); exit 1 if any."""
    from worker.ingest.receipts import receipts as read_receipts

    if file != "-":
        _readable(Path(file))
    _require_store()
    stream = sys.stdin if file == "-" else Path(file).open(encoding="utf-8")  # noqa: SIM115
    with stream:
        found = read_receipts(read_lines(stream))
    if as_json:
        out.print_json(json.dumps(found.as_json()))
    else:
        _print_receipts(found)
    if not found.complete:
        raise typer.Exit(Code.FOUND)


def _print_receipts(found: Any) -> None:
    """The counts, then each id not recorded, one per line under its heading."""
    total = len(found.recorded) + len(found.refused) + len(found.missing)
    out.print(
        f"{total} events: {len(found.recorded)} recorded, {len(found.refused)} refused, "
        f"{len(found.missing)} missing"
        + (f"; {len(found.unidentified)} lines without an event_id" if found.unidentified else "")
    )
    sections = (
        ("missing (not recorded: publish them again, an event counts once)", found.missing),
        ("refused (dead letters: accumsync dead-letters list --source ingest)", found.refused),
        ("lines without an event_id (no receipt possible)", found.unidentified),
    )
    for heading, items in sections:
        if items:
            sys.stdout.write(f"{heading}:\n" + "".join(f"  {i}\n" for i in items))


@app.command(rich_help_panel=INSPECT)
def status(as_json: JsonFlag = False) -> None:
    """Counters: events received and applied, duplicates, dead letters, dirty accumulators."""
    from worker.db import session_scope
    from worker.ops.reports import status as read_status

    _require_store()
    with session_scope() as session:
        values = read_status(session)
    if as_json:
        out.print_json(json.dumps(values))
        return
    table = Table("metric", "value", title="accumsync status")
    for key, value in values.items():
        table.add_row(key, str(value))
    out.print(table)


@dead_app.command("list")
def dead_list(
    as_json: JsonFlag = False,
    limit: Annotated[int, typer.Option(min=1)] = 50,
    source: Annotated[Source | None, typer.Option(help="only the letters from there")] = None,
    show_payload: Annotated[
        bool, typer.Option(help="include the raw payload (it holds member data)")
    ] = False,
) -> None:
    """The most recent dead letters with their reasons."""
    from worker.db import session_scope
    from worker.ops.reports import dead_letters

    _require_store()
    with session_scope() as session:
        rows = dead_letters(session, limit, source and source.value, show_payload)
    if as_json:
        out.print_json(json.dumps(rows))
        return
    columns = ("id", "source", "kind", "event_id", "count", "last seen", "reason")
    table = Table(*columns, title="dead letters")
    for r in rows:
        table.add_row(
            str(r["id"]),
            r["source"],
            r["kind"] or "",
            r["event_id"] or "",
            str(r["count"]),
            r["last_seen"],
            r["reason"],
        )
    out.print(table)


@dead_app.command("replay")
def dead_replay(
    ids: Annotated[
        list[int] | None, typer.Option("--id", help="a letter's id (repeatable)")
    ] = None,
    all_: Annotated[bool, typer.Option("--all", help="every open letter")] = False,
    source: Annotated[Source | None, typer.Option(help="every open letter from there")] = None,
    as_json: JsonFlag = False,
) -> None:
    """Re-queue dead-lettered events, or release dead-lettered accumulators, after a fix."""
    from worker.db import session_scope
    from worker.flush.plans import push_due
    from worker.ingest.producer import publish as send
    from worker.ops.replay import replay

    if not ids and not all_ and not source:
        err.print("name letters with --id N, or choose --all or --source")
        raise typer.Exit(Code.USAGE)
    _require_store()
    with _full_broker_exits(), session_scope() as session:
        done = replay(session, ids, source and source.value)
        # Publish before the commit marks them replayed: a failed publish leaves them open.
        sent = send(done.events) if done.events else 0
    pushes = push_due(plan_ids=done.plans) if done.plans else None
    if as_json:
        plans = _pushes_json(pushes) if pushes else None
        answer = {"republished": sent, "released": done.released, "plans": plans}
        out.print_json(json.dumps(answer | {"refused": done.refused}))
        return
    out.print(
        f"re-published {sent} events; released {done.released} accumulators for the next flush"
    )
    if pushes:
        _print_pushes(pushes, "plans re-sent")
    for why in done.refused:
        err.print(f"[yellow]not replayed: {why}[/yellow]")


@dead_app.command("resolve")
def dead_resolve(
    letter: Annotated[int, typer.Argument(help="the hold's id (dead-letters list)")],
    landed: Annotated[
        bool | None,
        typer.Option(
            "--landed/--not-landed",
            help="VBA holds our write (--landed) or does not (--not-landed); check VBA first",
        ),
    ] = None,
) -> None:
    """Settle a key held for a person: an ambiguous outcome, or a VBA row below our share."""
    from worker.db import session_scope
    from worker.ops.replay import NotResolvable, resolve

    if landed is None:
        err.print("say what VBA shows: --landed or --not-landed")
        raise typer.Exit(Code.USAGE)
    _require_store()
    try:
        with session_scope() as session:
            message = resolve(session, letter, landed)
    except NotResolvable as exc:
        err.print(f"[red]{exc}[/red]")
        raise typer.Exit(Code.FOUND) from None
    out.print(message)


@app.command(rich_help_panel=RUN)
def flush(
    wait: Annotated[bool, typer.Option(help="wait until nothing is left to flush")] = False,
    timeout: Annotated[float, typer.Option(help="seconds to wait at most")] = 600.0,
    poll: Annotated[float, typer.Option(help="seconds between checks")] = 1.0,
    as_json: JsonFlag = False,
) -> None:
    """Trigger a flush now; with --wait, wait for it: exit 1 on new dead letters, 3 if some are
    still pending at the timeout."""
    from worker.ops.flushwait import wait_for_flush

    _require_store()
    waited = wait_for_flush(wait=wait, timeout=timeout, poll=poll)
    figures = waited.figures
    if as_json:
        out.print_json(
            json.dumps({"queued": True, "waited": figures is not None} | (figures or {}))
        )
    elif figures is None:
        out.print("flush queued")
    else:
        out.print(" ".join(f"{k}={v}" for k, v in figures.items()))
        out.print(FLUSH_ENDS[Code(waited.code)].format(**figures, timeout=timeout))
    raise typer.Exit(waited.code)


@app.command(rich_help_panel=RUN)
def dispatch() -> None:
    """Start flushes as changes arrive, within a fraction of a second, at VBA's budget: one
    dispatcher leads, another only waits to take over (run it beside beat; SIGTERM stops it)."""
    from worker.celery import app as celery_app
    from worker.flush.dispatch import serve

    _require_store()
    err.print("dispatching flushes (Ctrl-C or SIGTERM stops)")
    serve(celery_app)


#: What ``flush --wait`` says last, by its exit code.
FLUSH_ENDS = {
    Code.OK: "[green]flushed: nothing left to send[/green]",
    Code.FOUND: "[red]some items ended as dead letters: `accumsync dead-letters list`[/red]",
    Code.PENDING: "[yellow]{pending} accumulators still pending after {timeout}s[/yellow]",
}


@app.command(rich_help_panel=REPAIR)
def reconcile(
    subscriber: Annotated[str | None, typer.Option(help="one pair: its subscriber_id")] = None,
    group: Annotated[str | None, typer.Option(help="one pair: its group_id")] = None,
    pairs: Annotated[
        Path | None, typer.Option(help="a file of subscriber_id,group_id lines")
    ] = None,
    all_: Annotated[bool, typer.Option("--all", help="every pair in the store")] = False,
    repair: Annotated[
        bool, typer.Option(help="mark drifted keys for the next flush to rewrite (no VBA write)")
    ] = False,
    as_json: JsonFlag = False,
    csv_file: Annotated[
        Path | None, typer.Option("--csv", help="write the keys not equal here (member data)")
    ] = None,
    rate: Annotated[
        float | None,
        typer.Option(min=0.1, help="VBA reads/s of the shared budget (ACCUMSYNC_RECONCILE_RATE)"),
    ] = None,
    restart: Annotated[bool, typer.Option(help="start over instead of resuming")] = False,
) -> None:
    """Is VBA right? Each key against VBA's row and the ledger; exit 1 on drift.

    Resumable: after Ctrl-C or a crash, the same command goes on after the last pair it
    finished. Reads take a share (--rate) of the fleet's VBA budget, so flushing goes on.
    """
    from worker import failpoints
    from worker.db import session_scope
    from worker.ops.reconcile import Reconcile, ScopeError, findings, scope_of, summary
    from worker.settings import get_settings
    from worker.vba import VbaError
    from worker.vba.fleet import client

    if pairs is not None:
        _readable(pairs)
    if csv_file is not None:
        _writable(csv_file)
    settings = get_settings()
    _require_store()
    try:
        with session_scope() as session:
            scope = scope_of(session, subscriber, group, pairs, all_)
    except ScopeError as exc:
        err.print(f"[red]{exc}[/red]")
        raise typer.Exit(Code.USAGE) from None
    columns = (TextColumn("reconciling"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=err, transient=False) as progress:
        bar = progress.add_task("pairs", total=len(scope.pair_ids))
        runner = Reconcile(
            client(),
            settings.ownership,
            rate or settings.reconcile_rate,
            repair,
            on_pair=lambda: progress.advance(bar),
        )
        try:
            run_id, resumed = runner.start(scope, restart)
            left = runner.left(run_id, scope)
            progress.update(bar, completed=len(scope.pair_ids) - len(left))
            failpoints.hit("reconcile.before_run")
            runner.run(run_id, left)
        except (KeyboardInterrupt, Exception) as exc:
            progress.stop()
            _exit_if_interrupted(exc, "run the same command again to go on where this stopped")
            if isinstance(exc, VbaError):
                err.print(f"[red]VBA: {exc}[/red]; run the same command again to go on from here")
                raise typer.Exit(Code.ENVIRONMENT) from None
            raise
    report = summary(run_id, scope, resumed)
    rows = findings(run_id)
    if csv_file is not None:
        _write_findings(csv_file, rows)
    if as_json:
        out.print_json(json.dumps(report.as_dict() | {"keys": rows}))
    else:
        _print_reconcile(report, csv_file)
    raise typer.Exit(1 if report.drifted else 0)


def _print_reconcile(report: Any, csv_file: Path | None) -> None:
    resumed = f", resumed run {report.run_id}" if report.resumed else f", run {report.run_id}"
    table = Table("keys", "count", title=f"reconcile: {report.scope}{resumed}")
    table.add_row("checked", str(report.keys_checked))
    table.add_row("equal", str(report.equal))
    for finding, n in sorted(report.findings.items()):
        table.add_row(finding.replace("_", " "), str(n))
    if report.repaired:
        table.add_row("repaired (the next flush rewrites them)", str(report.repaired))
    out.print(table)
    if report.fields:
        by_field = Table("VBA field", "keys", title="not as expected, by field")
        for name, n in sorted(report.fields.items(), key=lambda kv: (-kv[1], kv[0])):
            by_field.add_row(name, str(n))
        out.print(by_field)
    if csv_file is not None:
        out.print(f"keys not equal: {csv_file}")
    if report.drifted:
        err.print(f"[red]{report.drifted} keys drifted[/red]")


def _write_findings(path: Path, rows: list[dict[str, Any]]) -> None:
    import csv

    names = (
        "subscriber_id",
        "group_id",
        "plan_year",
        "plan_type",
        "benefit_code",
        "finding",
        "repaired",
        "of",
        "field",
        "found",
        "expected",
        "vba_own",
    )
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=names, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            key = {k: row[k] for k in names[:7]}
            for diff in row["fields"] or [{}]:
                writer.writerow(key | diff)


@app.command(rich_help_panel=INSPECT)
def explain(
    subscriber: Annotated[str, typer.Option(help="the member's subscriber_id")],
    group: Annotated[str, typer.Option(help="the member's group_id")],
    benefit: Annotated[str | None, typer.Option(help="one benefit_code only")] = None,
    as_json: JsonFlag = False,
) -> None:
    """Why a member's totals are what they are: the claims behind each, what VBA confirmed.

    Prints member data, to this terminal only (nothing of it is logged).
    """
    from worker.db import session_scope
    from worker.ops.explain import NotFound
    from worker.ops.explain import explain as read

    _require_store()
    try:
        with session_scope() as session:
            story = read(session, subscriber, group, benefit)
    except NotFound as exc:
        err.print(str(exc))
        raise typer.Exit(1) from None
    if as_json:
        out.print_json(json.dumps(story))
        return
    _print_story(story)


def _print_story(story: dict[str, Any]) -> None:
    pair = story["pair"]
    out.print(f"[bold]subscriber {story['subscriber_id']}, group {story['group_id']}[/bold]")
    confirmed = pair["last_confirmed_at"] or "never"
    out.print(f"VBA last confirmed a write {confirmed} (activityId {pair['last_activity_id']})")
    if pair["last_error"]:
        out.print(
            f"[yellow]last error: {pair['last_error']}[/yellow] "
            f"(attempts {pair['attempts']}, next {pair['next_attempt_at']})"
        )
    for key in story["keys"]:
        name = f"{key['plan_year']} / {key['plan_type']} / {key['benefit_code']}"
        totals = Table("VBA field", "ours", "VBA confirmed", "from the claims", title=name)
        for f in key["totals"]:
            totals.add_row(f["field"], f["ours"], f["confirmed"], f["claims"])
        out.print(totals)
        if not key["adds_up"]:
            err.print("[red]the claims do not add up to our total: run `accumsync reconcile`[/red]")
        claims = Table("claim", "version", "versions received", "network", "amounts", "received")
        for c in key["claims"]:
            amounts = ", ".join(f"{k} {v}" for k, v in c["amounts"].items())
            received = ", ".join(map(str, c["versions_received"]))
            claims.add_row(
                c["claim_id"],
                str(c["version"]),
                received,
                c["network"],
                amounts,
                c["received_at"] or "",
            )
        out.print(claims)
        state = key["state"]
        out.print(f"state: {state['what']}; attempts {state['attempts']}")
        if state["in_flight"]:
            out.print(
                f"in flight since {state['in_flight']['since']}: {state['in_flight']['target']}"
            )
        for d in key["dead_letters"]:
            mark = "open" if d["open"] else f"closed ({d['resolution'] or 'replayed'})"
            out.print(f"dead letter {d['id']} [{d['kind'] or 'refused'}, {mark}]: {d['reason']}")


@plans_app.command("push")
def plans_push(
    file: Annotated[Path, typer.Argument(help="YAML or JSON: a list of plan accumulators")],
    force: Annotated[bool, typer.Option(help="send plans even when unchanged")] = False,
    as_json: JsonFlag = False,
) -> None:
    """Validate plan accumulator definitions and send one batch per changed plan."""
    from worker.flush.plans import PlanFileError, load_plans, push_plans

    try:
        plans = load_plans(_readable(file))
    except PlanFileError as exc:
        err.print(f"[red]{exc}[/red]")
        raise typer.Exit(Code.USAGE) from None
    _require_store()
    report = push_plans(plans, force=force)
    if as_json:
        out.print_json(json.dumps(_pushes_json(report)))
    else:
        _print_pushes(report, "plans push")
    if report.failed:
        err.print(f"[red]{report.failed} records refused: see `accumsync dead-letters list`[/red]")
        raise typer.Exit(Code.FOUND)


def _pushes_json(report: Any) -> dict[str, Any]:
    plans = [{"plan_id": p, "records": n, "outcome": o} for p, n, o in report.rows]
    return {"plans": plans, "failed": report.failed, "pending": report.pending}


def _print_pushes(report: Any, title: str) -> None:
    table = Table("plan", "records", "outcome", title=title)
    for row in report.rows:
        table.add_row(*row)
    out.print(table)
    if report.pending:
        err.print(f"{report.pending} plans wait for VBA: the worker retries them (beat)")


@app.command(rich_help_panel=DEVELOP)
def schema() -> None:
    """Print ClaimEvent v1 as a JSON Schema (the file in schemas/), for producers to validate."""
    from models.events import json_schema

    sys.stdout.write(json.dumps(json_schema(), indent=2, ensure_ascii=False) + "\n")


@app.command(rich_help_panel=DEVELOP)
def demo(
    events: Annotated[int, typer.Option(min=100, help="events to generate")] = 5_000,
    members: Annotated[int, typer.Option(min=1, help="subscribers they spread over")] = 300,
    broker_url: Annotated[str, typer.Option(help="e.g. redis://127.0.0.1:6379/0")] = "",
    database_url: Annotated[
        str, typer.Option(help="e.g. postgresql+psycopg://user@host/db (an empty database)")
    ] = "",
    home: Annotated[Path | None, typer.Option(help="keep files here instead of a temp dir")] = None,
    keep: Annotated[bool, typer.Option(help="keep the temp dir (store, broker, logs)")] = False,
    timeout: Annotated[float, typer.Option(help="seconds each stage may take")] = 600.0,
) -> None:
    """The whole pipeline against the bundled sandbox, verified to the cent; no server needed."""
    import signal

    from worker.demo.demo import Demo, Options

    def on_signal(signum: int, _frame: object) -> None:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not skip the cleanup
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    opts = Options(events, members, broker_url, database_url, home, keep, timeout=timeout)
    try:
        code = Demo(opts, out).run()
    except (KeyboardInterrupt, Exception) as exc:
        _exit_if_interrupted(exc, "every child process was stopped")
        if isinstance(exc, (TimeoutError, RuntimeError)):
            err.print(f"[red]demo failed: {exc}[/red]")
            raise typer.Exit(Code.FOUND) from None
        raise
    raise typer.Exit(code)


@app.command(rich_help_panel=INSPECT)
def health(
    max_dirty_age: Annotated[
        float | None, typer.Option(help="seconds; default ACCUMSYNC_HEALTH_MAX_DIRTY_AGE")
    ] = None,
    max_flush_age: Annotated[
        float | None, typer.Option(help="seconds; default ACCUMSYNC_HEALTH_MAX_FLUSH_AGE")
    ] = None,
    max_idle: Annotated[
        float | None, typer.Option(help="seconds; default ACCUMSYNC_HEALTH_MAX_IDLE")
    ] = None,
    samples: Annotated[int, typer.Option(min=1, help="queue length samples")] = 3,
    interval: Annotated[float, typer.Option(min=0.0, help="seconds between samples")] = 1.0,
    as_json: JsonFlag = False,
) -> None:
    """Exit 0 when accumsync makes progress; 1, with the reasons, when it does not."""
    from worker.ops.health import Limits, check
    from worker.settings import get_settings

    limits = Limits.of(
        get_settings(),
        max_dirty_age=max_dirty_age,
        max_flush_age=max_flush_age,
        max_idle=max_idle,
        samples=samples,
        interval=interval,
    )
    report = check(limits)
    if as_json:
        out.print_json(json.dumps(report.as_dict()))
    else:
        for c in report.checks:
            mark = "[green]ok  [/green]" if c.ok else "[red]FAIL[/red]"
            limit = f" (limit {c.limit:g}s)" if c.limit is not None else ""
            out.print(f"{mark} {c.name}: {c.reason}{limit}")
        out.print("healthy" if report.healthy else "[red]unhealthy[/red]")
    raise typer.Exit(0 if report.healthy else 1)


@app.command(rich_help_panel=INSPECT)
def metrics(
    port: Annotated[int, typer.Option(help="port to serve /metrics on")] = 9808,
    host: Annotated[str, typer.Option(help="address to bind")] = "127.0.0.1",
    once: Annotated[bool, typer.Option(help="print the metrics once and exit")] = False,
) -> None:
    """Serve Prometheus metrics read from the store and the broker at each scrape."""
    from worker.ops.metrics import registry, server

    if once:
        from prometheus_client import generate_latest

        sys.stdout.write(generate_latest(registry()).decode())
        return
    httpd = server(host, port)
    err.print(f"metrics on http://{host}:{port}/metrics")
    try:
        httpd.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        httpd.server_close()


@app.command(rich_help_panel=REPAIR)
def prune(as_json: JsonFlag = False) -> None:
    """Delete audit rows older than ACCUMSYNC_AUDIT_RETENTION_DAYS now (beat does it hourly)."""
    from worker.ops.retention import prune as prune_audit
    from worker.settings import get_settings

    _require_store()
    deleted = prune_audit(get_settings())
    if as_json:
        out.print_json(json.dumps(deleted))
    elif not deleted:
        out.print("retention is off (ACCUMSYNC_AUDIT_RETENTION_DAYS=0): nothing deleted")
    else:
        out.print(", ".join(f"{table}: {n} rows deleted" for table, n in deleted.items()))


def _mount_sandbox() -> None:
    from worker.sandbox.cli import sandbox

    app.command("sandbox", rich_help_panel=DEVELOP)(sandbox)


_mount_sandbox()


def main() -> None:
    """Console-script entry point: a configuration or connection problem prints the line or two
    that name it and its fix, and exits 4; ``--debug`` (ACCUMSYNC_DEBUG=1) shows the traceback.
    A file the system refuses (the store's folder not writable, say) gets one line too."""
    from worker.problems import interrupted, problem_of

    try:
        app()
    except Exception as exc:
        if interrupted(exc) and not _debug["on"]:
            sys.stderr.write("accumsync: interrupted\n")
            sys.exit(Code.INTERRUPTED)
        problem = problem_of(exc)
        if problem is None and isinstance(exc, OSError) and exc.filename is not None:
            problem = f"accumsync: {exc.filename}: {exc.strerror or exc}"
        if problem is None or _debug["on"]:
            raise
        sys.stderr.write(problem + "\n")
        sys.exit(Code.ENVIRONMENT)
