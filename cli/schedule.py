"""``lifelong schedule``: run a pipeline on a schedule, and manage the schedules.

One command, one action per call, so each reads as a sentence::

    lifelong schedule CONFIG.toml --cron "0 2 * * *" [--name N] [--timezone TZ] [--set k=v ...]
    lifelong schedule CONFIG.toml --interval 3600 | --rrule "FREQ=WEEKLY;BYDAY=MO;BYHOUR=2"
    lifelong schedule --list
    lifelong schedule --pause NAME | --resume NAME | --delete NAME

Creating a schedule serves it: the command stays in the foreground and runs the scheduled (and
any manually triggered) runs until Ctrl-C, like ``prefect`` served flows. Everything that can be
checked here is checked before the server is touched — the options, the schedule expression, the
config and its data — and every refusal is one ``error:`` line with a non-zero exit.

The Prefect logic is in ``flows/schedules.py``; this module only parses and prints. It is
registered on the main app in ``cli/main.py``; it also runs on its own
(``python -m lifelong.cli.schedule schedule ...``), which is how the tests start a served process.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Annotated

import typer

import lifelong  # noqa: F401  (prepares Prefect's environment before anything imports it)
from lifelong.cli.common import check_before_work, fail


def schedule(
    config: Annotated[Path | None, typer.Argument(
        help="TOML config to run on the schedule (its `flow` key picks the flow)")] = None,
    cron: Annotated[str | None, typer.Option(
        help='Cron expression, e.g. "0 2 * * *" (02:00 every day)', show_default=False)] = None,
    interval: Annotated[float | None, typer.Option(
        help="Run every SECONDS", metavar="SECONDS", show_default=False)] = None,
    rrule: Annotated[str | None, typer.Option(
        help='iCalendar RRule, e.g. "FREQ=WEEKLY;BYDAY=MO;BYHOUR=2;BYMINUTE=0"', show_default=False)] = None,
    timezone: Annotated[str | None, typer.Option(
        help="IANA time zone the schedule is read in (default: UTC)", show_default=False)] = None,
    name: Annotated[str | None, typer.Option(
        help="Deployment name (default: the config file's name, e.g. `default`)", show_default=False)] = None,
    set_: Annotated[list[str], typer.Option(
        "--set", help="Override a config key: --set training.epochs=3")] = [],
    list_: Annotated[bool, typer.Option(
        "--list", help="List the deployments: schedules, active/paused, served, next run")] = False,
    pause: Annotated[str | None, typer.Option(
        help="Pause a deployment (NAME or flow/NAME)", metavar="NAME", show_default=False)] = None,
    resume: Annotated[str | None, typer.Option(
        help="Resume a paused deployment", metavar="NAME", show_default=False)] = None,
    delete: Annotated[str | None, typer.Option(
        help="Delete a deployment and its scheduled runs", metavar="NAME", show_default=False)] = None,
) -> None:
    """Run a pipeline on a schedule (a Prefect deployment served here), or manage the schedules.

    Needs a Prefect server (PREFECT_API_URL): Prefect's ephemeral API cannot run schedules.
    """

    manage = {"--list": list_ or None, "--pause": pause, "--resume": resume, "--delete": delete}
    chosen = [opt for opt, value in manage.items() if value is not None]
    creating = [opt for opt, value in (("CONFIG", config), ("--cron", cron), ("--interval", interval),
                                       ("--rrule", rrule), ("--timezone", timezone), ("--name", name),
                                       ("--set", set_ or None)) if value is not None]
    if len(chosen) > 1 or (chosen and creating):
        fail(f"{' and '.join(chosen + creating)} do not go together: give a CONFIG with a schedule, "
              "or one of --list, --pause, --resume, --delete")
    if chosen:
        _manage(chosen[0], manage[chosen[0]])
        return
    if config is None:
        fail("give a CONFIG.toml and a schedule (e.g. `lifelong schedule configs/default.toml "
              '--cron "0 2 * * *"`), or one of --list, --pause, --resume, --delete')
    _create_and_serve(config, cron, interval, rrule, timezone, name, set_)


def _create_and_serve(config: Path, cron, interval, rrule, timezone, name, set_) -> None:
    from lifelong.config import ConfigError, load_config
    from lifelong.flows import schedules as sched

    try:
        when = sched.build_schedule(cron=cron, interval=interval, rrule=rrule, timezone=timezone)
    except sched.ScheduleError as exc:
        fail(str(exc), exc.code)
    try:
        cfg = load_config(config, set_)
    except (ConfigError, ValueError) as exc:
        fail(str(exc))
    name = name or sched.default_name(config)
    try:  # the name first: a refused schedule touches no data and no store
        deployment = sched.make_deployment(cfg, name, when, source=str(config))
    except sched.ScheduleError as exc:
        fail(str(exc), exc.code)
    try:
        check_before_work(cfg)
    except (ConfigError, ValueError) as exc:
        fail(str(exc))
    try:
        url = sched.require_server()
        full = sched.apply(deployment)
    except sched.ScheduleError as exc:
        fail(str(exc), exc.code)
    params = sched.deployment_parameters(cfg)["config"]
    typer.echo(f"deployment {full}: {sched.describe_schedule(when)}, on the Prefect server at {url}")
    typer.echo(f"  runs the {cfg.flow} flow with the config from {config} as validated now "
               f"(MLflow: {params['tracking']['uri']})")
    typer.echo(f"  run it now:  prefect deployment run '{full}'")
    typer.echo("  manage it:   lifelong schedule --list | --pause NAME | --resume NAME | --delete NAME")
    typer.echo("serving: scheduled and triggered runs execute here; Ctrl-C stops (and pauses the schedule)")
    if sched.serve(deployment):
        typer.echo(f"stopped serving {full} (Prefect paused it; serving it again resumes it)")
    else:
        typer.echo(f"stopped serving {full} (it had been deleted)")


def _manage(option: str, name) -> None:
    from lifelong.flows import schedules as sched

    try:
        if option == "--list":
            _print_list(sched.list_deployments())
            return
        action = {"--pause": sched.pause, "--resume": sched.resume, "--delete": sched.delete}[option]
        full, served = action(name)
    except sched.ScheduleError as exc:
        fail(str(exc), exc.code)
    done = {"--pause": "paused (its scheduled runs are removed until it is resumed)",
            "--resume": "resumed" + ("" if served else "; nobody serves it: run `lifelong schedule CONFIG "
                                                        "--cron ...` again (same name) so its runs execute"),
            "--delete": "deleted with its scheduled runs (finished runs and their MLflow records are kept)"
            + ("; the process serving it keeps running until you stop it" if served else "")}[option]
    typer.echo(f"{full}: {done}")


def _print_list(rows) -> None:
    if not rows:
        typer.echo("no scheduled Lifelong pipelines on this server "
                   '(create one: lifelong schedule CONFIG.toml --cron "0 2 * * *")')
        return
    width = max(len(r.name) for r in rows) + 2
    typer.echo(f"{'deployment':<{width}}{'state':<10}{'served':<8}{'next run (UTC)':<21}schedule")
    waiting = []
    for r in rows:
        if r.next_run is not None:
            nxt = r.next_run.astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M:%S")
        elif r.state == "active":
            nxt = "none yet"
            waiting.append(r.name)
        else:
            nxt = "-"
        served = "yes" if r.served else "no"
        typer.echo(f"{r.name:<{width}}{r.state:<10}{served:<8}{nxt:<21}{'; '.join(r.schedules)}")
    if waiting:
        typer.echo(f"note: no run of {', '.join(waiting)} is scheduled yet; the server's scheduler creates "
                   "them within seconds of a change; if none appear, its log says why")
    if any(not r.served and r.state == "active" for r in rows):
        typer.echo("note: a deployment nobody serves gets late runs; serve it again with "
                   "`lifelong schedule CONFIG --cron ...` (same name)")


# Standalone use (`python -m lifelong.cli.schedule schedule ...`): the same command on a tiny app.
# The callback keeps the command's name on the command line, as under `lifelong`.
app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, no_args_is_help=True)
app.callback()(lambda: None)
app.command("schedule")(schedule)


if __name__ == "__main__":  # pragma: no cover
    app(prog_name="lifelong")
