"""``accumsync sandbox``: serve the VBA emulator, its faults set by flags."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from worker.sandbox import config as c

#: The help's panel for the flags that set the sandbox's faults (the rest configure the server).
FAULTS = "Faults"


def fault(**options: Any) -> Any:
    """A fault flag: ``typer.Option`` in the help's Faults panel."""
    return typer.Option(rich_help_panel=FAULTS, **options)


FaultShare = Annotated[float, fault(min=0.0, max=1.0)]


def secret(value: str | None, path: Path | None, option: str, default: str) -> str:
    """The secret from ``--x`` or from ``--x-file`` (its content, final newline dropped, as
    Docker and Kubernetes secrets are read); both given is refused, naming them."""
    if path is None:
        return default if value is None else value
    if value is not None:
        raise typer.BadParameter(f"{option} and {option}-file are both set: keep one")
    try:
        return path.read_text(encoding="utf-8").rstrip("\r\n")
    except (OSError, UnicodeDecodeError) as exc:
        why = getattr(exc, "strerror", None) or str(exc)
        raise typer.BadParameter(f"{option}-file: cannot read {path}: {why}") from None


def sandbox(
    port: Annotated[int, typer.Option(help="port to listen on")] = 8700,
    host: Annotated[str, typer.Option(help="address to bind (loopback by default)")] = "127.0.0.1",
    state: Annotated[Path | None, typer.Option(help="SQLite file keeping rows and tokens")] = None,
    rate: Annotated[float, typer.Option(help="VBA's rate limit, requests/s")] = 25.0,
    burst: Annotated[int, typer.Option(help="VBA's burst")] = 50,
    api_key: Annotated[
        str | None, typer.Option(help=f"the x-api-key it accepts [default: {c.API_KEY}]")
    ] = None,
    api_key_file: Annotated[
        Path | None,
        typer.Option(
            envvar="ACCUMSYNC_VBA_API_KEY_FILE", dir_okay=False, help="read --api-key from a file"
        ),
    ] = None,
    database: Annotated[str, typer.Option(help="the vbasoftware-database it serves")] = c.DATABASE,
    username: Annotated[str, typer.Option(help="login user")] = c.USERNAME,
    password: Annotated[
        str | None, typer.Option(help=f"login password [default: {c.PASSWORD}]")
    ] = None,
    password_file: Annotated[
        Path | None,
        typer.Option(
            envvar="ACCUMSYNC_VBA_PASSWORD_FILE", dir_okay=False, help="read --password from a file"
        ),
    ] = None,
    client_id: Annotated[str, typer.Option(help="vbasoftware-client-id")] = c.CLIENT_ID,
    client_code: Annotated[str, typer.Option(help="vbasoftware-client-code")] = c.CLIENT_CODE,
    admin_token: Annotated[str | None, typer.Option(help="required x-admin-token")] = None,
    seed: Annotated[int | None, typer.Option(help="seed of the fault dice")] = None,
    dialect: Annotated[
        c.Dialect,
        typer.Option(help="strict: as a real VBA most likely answers; lax: the seeds' letter"),
    ] = "strict",
    id_spelling: Annotated[
        c.IdSpelling, typer.Option(help="207 id key names: exact (subscriber_ID) or camel")
    ] = "exact",
    error_500: FaultShare = 0.0,
    error_502: FaultShare = 0.0,
    error_503: FaultShare = 0.0,
    rate_429: Annotated[float, fault(min=0.0, max=1.0, help="429 storm share")] = 0.0,
    retry_after: Annotated[float, fault(help="Retry-After seconds")] = 1.0,
    retry_after_date: Annotated[bool, fault(help="Retry-After as HTTP date")] = False,
    latency: Annotated[float, fault(help="seconds added to each answer")] = 0.0,
    timeout_rate: FaultShare = 0.0,
    timeout_seconds: Annotated[float, fault(help="how long a hung call hangs")] = 35.0,
    item_error_rate: Annotated[float, fault(min=0.0, max=1.0, help="207 item 500s")] = 0.0,
    item_written_error_rate: Annotated[
        float, fault(min=0.0, max=1.0, help="207 items written, then answered 500")
    ] = 0.0,
    item_written_errors: Annotated[
        int, fault(min=0, help="the next N 207 items written, then answered 500")
    ] = 0,
    lost_answer_rate: Annotated[
        float, fault(min=0.0, max=1.0, help="batch calls written, then answer lost")
    ] = 0.0,
    lost_answers: Annotated[
        int, fault(min=0, help="the next N batch calls written, then answer lost")
    ] = 0,
    lost_answer: Annotated[
        c.LostAnswer, fault(help="how an answer is lost: 504, reset or hang")
    ] = "504",
    late_rate: Annotated[
        float,
        fault(min=0.0, max=1.0, help="batch calls a gateway answers at once, written later"),
    ] = 0.0,
    late_answers: Annotated[
        int, fault(min=0, help="the next N batch calls answered at once, written later")
    ] = 0,
    late_status: Annotated[
        c.LateStatus, fault(help="the gateway's answer to a late call: 502, 504, either")
    ] = "either",
    late_seconds: Annotated[
        float, fault(min=0.0, help="seconds after the answer that late writes land")
    ] = 0.5,
    late_never: Annotated[
        float, fault(min=0.0, max=1.0, help="late calls whose writes never land")
    ] = 0.0,
    list_gateway_404_rate: Annotated[
        float, fault(min=0.0, max=1.0, help="lists a gateway answers 404 (not 'no rows')")
    ] = 0.0,
    list_gateway_404s: Annotated[
        int, fault(min=0, help="the next N lists answered 404 by a gateway")
    ] = 0,
    list_delay: Annotated[float, fault(min=0.0, help="seconds before a list reads")] = 0.0,
    slow_lists: Annotated[
        int | None, fault(min=0, help="how many lists wait --list-delay (default: all)")
    ] = None,
    list_status: Annotated[
        int | None, fault(min=400, max=599, help="every list answers this error status")
    ] = None,
    forbidden: Annotated[bool, fault(help="the gateway answers 403 to every call")] = False,
    refuse_batch_with: Annotated[
        str | None, fault(help="a batch holding this benefit_Code is refused whole (400)")
    ] = None,
    shuffle: Annotated[bool, fault(help="shuffle a 207's data[]")] = False,
    token_ttl: Annotated[float, fault(help="id token lifetime, seconds")] = 86400.0,
    down: Annotated[bool, fault(help="answer 503 to every VBA call")] = False,
) -> None:
    """Serve a faithful VBA emulator (auth, validation, 207, paging, rate limit, faults)."""
    faults = c.Faults(
        error_500=error_500,
        error_502=error_502,
        error_503=error_503,
        rate_429=rate_429,
        retry_after=retry_after,
        retry_after_date=retry_after_date,
        latency=latency,
        timeout_rate=timeout_rate,
        timeout_seconds=timeout_seconds,
        item_error_rate=item_error_rate,
        item_written_error_rate=item_written_error_rate,
        item_written_errors=item_written_errors,
        lost_answer_rate=lost_answer_rate,
        lost_answers=lost_answers,
        lost_answer=lost_answer,
        late_rate=late_rate,
        late_answers=late_answers,
        late_status=late_status,
        late_seconds=late_seconds,
        late_never=late_never,
        list_gateway_404_rate=list_gateway_404_rate,
        list_gateway_404s=list_gateway_404s,
        list_delay=list_delay,
        slow_lists=slow_lists,
        list_status=list_status,
        forbidden=forbidden,
        refuse_batch_with=refuse_batch_with,
        shuffle=shuffle,
        token_ttl=token_ttl,
        down=down,
    )
    config = c.SandboxConfig(
        api_key=secret(api_key, api_key_file, "--api-key", c.API_KEY),
        database=database,
        username=username,
        password=secret(password, password_file, "--password", c.PASSWORD),
        client_id=client_id,
        client_code=client_code,
        rate=rate,
        burst=burst,
        state=state,
        admin_token=admin_token,
        seed=seed,
        faults=faults,
        dialect=dialect,
        id_spelling=id_spelling,
    )
    from worker.sandbox.app import serve  # the server's imports, only when serving

    where = f"http://{host}:{port} (database {database!r}, {dialect} dialect)"
    typer.echo(f"VBA sandbox on {where}", err=True)
    serve(host, port, config)
