"""``accumsync``: the command line an operator drives the worker with."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
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
)
db_app = typer.Typer(help="The store's schema.", no_args_is_help=True)
dead_app = typer.Typer(help="Events and items that were refused, with their reasons.")
app.add_typer(db_app, name="db")
app.add_typer(dead_app, name="dead-letters")
out = Console()
err = Console(stderr=True)

JsonFlag = Annotated[bool, typer.Option("--json", help="machine-readable output")]


@db_app.command("upgrade")
def db_upgrade() -> None:
    """Create or migrate the store's tables to the latest schema."""
    from worker.db import upgrade

    upgrade()
    out.print("[green]database is at the latest schema[/green]")


@db_app.command("check")
def db_check() -> None:
    """Exit non-zero unless the store's schema is current."""
    from worker.db import NotMigrated, check_migrated

    try:
        check_migrated()
    except NotMigrated as exc:
        err.print(f"[red]{exc}[/red]")
        raise typer.Exit(1) from None
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


@app.command()
def publish(
    file: Annotated[str, typer.Argument(help="a JSONL file of ClaimEvent v1, or - for stdin")],
    batch_size: Annotated[int, typer.Option(min=1, max=50_000)] = 500,
) -> None:
    """Publish ClaimEvent v1 lines to the ingest queue, in batches."""
    from worker.producer import publish as send

    total = None if file == "-" else _count_lines(Path(file))
    stream = sys.stdin if file == "-" else Path(file).open(encoding="utf-8")  # noqa: SIM115
    columns = (TextColumn("publishing"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with stream, Progress(*columns, console=err, transient=False) as progress:
        task = progress.add_task("publish", total=total)
        sent = send(read_lines(stream), batch_size, on_batch=lambda n: progress.advance(task, n))
    out.print(f"published {sent} events in batches of {batch_size}")


@app.command()
def status(as_json: JsonFlag = False) -> None:
    """Counters: events received and applied, duplicates, dead letters, dirty accumulators."""
    from worker.db import session_scope
    from worker.reports import status as read_status

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
    source: Annotated[str | None, typer.Option(help="ingest | flush | plans")] = None,
    show_payload: Annotated[
        bool, typer.Option(help="include the raw payload (it holds member data)")
    ] = False,
) -> None:
    """The most recent dead letters with their reasons."""
    from worker.db import session_scope
    from worker.reports import dead_letters

    with session_scope() as session:
        rows = dead_letters(session, limit, source, show_payload)
    if as_json:
        out.print_json(json.dumps(rows))
        return
    table = Table("id", "source", "event_id", "count", "last seen", "reason", title="dead letters")
    for r in rows:
        table.add_row(
            str(r["id"]),
            r["source"],
            r["event_id"] or "",
            str(r["count"]),
            r["last_seen"],
            r["reason"],
        )
    out.print(table)


def main() -> None:
    """Console-script entry point."""
    app()
