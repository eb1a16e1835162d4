"""``lifelong stack up|down|status``: the whole stack natively on this machine (``cli/local_stack.py``).

    lifelong stack up [--detach] [--supernodes N] [--workdir DIR] [--mlflow-port P] ...
    lifelong stack status [--workdir DIR]
    lifelong stack down [--workdir DIR]

``up`` stays in the foreground until Ctrl-C unless ``--detach``: then it returns once every service
is healthy, and ``down`` stops the stack later from the state file in the work folder. Also runs on
its own: ``python -m lifelong.cli.stack up`` (what ``make stack`` calls).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

import lifelong  # noqa: F401  (prepares Prefect's environment before anything imports it)

stack_app = typer.Typer(help="The whole stack (MLflow, Prefect server + worker, Flower SuperLink + "
                        "SuperNodes) natively on this machine, on loopback.", no_args_is_help=True,
                        add_completion=False, pretty_exceptions_enable=False)

WorkdirOpt = Annotated[Path, typer.Option(help="Logs, databases and the state file go here")]
DEFAULT_WORKDIR = Path(os.environ.get("LIFELONG_STACK_DIR", ".lifelong/stack"))


def _env_int(name: str, default: int) -> int:
    try:
        return int(os.environ.get(name, default))
    except ValueError:
        return default


def _fail(message: str, code: int = 1) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


@stack_app.command("up")
def up(
    workdir: WorkdirOpt = DEFAULT_WORKDIR,
    detach: Annotated[bool, typer.Option("--detach", "-d", help="Return once healthy; stop with `down`")] = False,
    supernodes: Annotated[int, typer.Option(min=1, help="Flower SuperNodes (partition-id 0..N-1)")] = _env_int(
        "LIFELONG_STACK_SUPERNODES", 2),
    mlflow_port: Annotated[int, typer.Option(help="0: a free port")] = _env_int("MLFLOW_PORT", 5000),
    prefect_port: Annotated[int, typer.Option(help="0: a free port")] = _env_int("PREFECT_PORT", 4200),
    worker_port: Annotated[int, typer.Option(help="Prefect worker's health server; 0: a free port")] = _env_int(
        "PREFECT_WORKER_HEALTH_PORT", 8085),
    superlink_port: Annotated[int, typer.Option(help="0: a free port")] = _env_int("SUPERLINK_PORT", 9093),
    mlflow_backend_uri: Annotated[str | None, typer.Option(
        help="MLflow backend store (default: $LIFELONG_STACK_MLFLOW_BACKEND_URI or SQLite in the work folder), "
        "e.g. postgresql://user@host/mlflow", show_default=False)] = None,
    no_ui: Annotated[bool, typer.Option("--no-ui", help="Do not serve Prefect's UI")] = False,
) -> None:
    """Start every service, wait until each is healthy, print the URLs and what to export."""
    from lifelong.cli.local_stack import Stack, StackError, describe

    stack = Stack(workdir, ports={"mlflow": mlflow_port, "prefect-server": prefect_port,
                                  "prefect-worker": worker_port, "superlink": superlink_port},
                  n_supernodes=supernodes, mlflow_backend_uri=mlflow_backend_uri, prefect_ui=not no_ui)
    typer.echo(f"starting the stack in {stack.workdir} (MLflow, Prefect server + worker, "
               f"a SuperLink and {supernodes} SuperNodes) ...")
    try:
        if not detach:
            raise typer.Exit(stack.serve(typer.echo))
        stack.up()
    except StackError as exc:
        _fail(str(exc))
    typer.echo(describe(stack))
    typer.echo(f"detached; stop it with: python -m lifelong.cli.stack down --workdir {stack.workdir}"
               " (or make stack-down)")


@stack_app.command("status")
def status(workdir: WorkdirOpt = DEFAULT_WORKDIR) -> None:
    """Each service's health, for a stack started with ``up --detach``."""
    from lifelong.cli.local_stack import status as stack_status

    st = stack_status(workdir)
    if not st:
        _fail(f"no stack state in {workdir.resolve()} (start one with `up --detach`)")
    for name, ok in st["services"].items():
        typer.echo(f"  {name:<16} {'healthy' if ok else 'DOWN'}")
    typer.echo(f"  {st['processes']} processes; " + ", ".join(f"{k}={v}" for k, v in st["exports"].items()))
    if not all(st["services"].values()):
        raise typer.Exit(1)


@stack_app.command("down")
def down(workdir: WorkdirOpt = DEFAULT_WORKDIR) -> None:
    """Stop a detached stack: every process it started, and theirs."""
    from lifelong.cli.local_stack import StackError
    from lifelong.cli.local_stack import down as stack_down

    try:
        n = stack_down(workdir)
    except StackError as exc:
        _fail(str(exc))
    typer.echo(f"stack stopped ({n} processes)" if n else f"no stack running from {workdir.resolve()}")


if __name__ == "__main__":
    stack_app()
