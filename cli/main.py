"""The ``lifelong`` command: run pipelines, list strategies and streams, read results."""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

import lifelong  # noqa: F401  (prepares Prefect's environment before anything imports it)
from lifelong.cli.audit import audit as audit_command
from lifelong.cli.common import check_before_work, fail
from lifelong.cli.privacy import privacy_app
from lifelong.cli.prune import prune as prune_command
from lifelong.cli.registry import registry_app
from lifelong.cli.schedule import schedule as schedule_command
from lifelong.cli.stack import stack_app
from lifelong.config import ConfigError, load_config
from lifelong.env import in_process_flow_runs

app = typer.Typer(
    name="lifelong",
    help="Continual and federated learning pipelines: Prefect flows, Avalanche strategies, "
    "Flower rounds, MLflow tracking.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.command()
def run(
    config: Annotated[Optional[Path], typer.Argument(help="TOML config (default: built-in defaults)")] = None,
    set_: Annotated[list[str], typer.Option("--set", help="Override a key: --set training.epochs=3")] = [],
    resume: Annotated[Optional[str], typer.Option(
        help="Continue an interrupted run (its MLflow run id) from its last checkpoint")] = None,
    tracking_uri: Annotated[Optional[str], typer.Option(
        help="--resume: the MLflow store of the run (default: ./mlruns.db)")] = None,
    continue_from: Annotated[Optional[str], typer.Option(
        "--continue-from", help="Keep learning from this lineage's version (an alias such as 'champion', or a "
        "number) on the folder stream's new files; same as --set tracking.continue_from=...")] = None,
) -> None:
    """Run a pipeline: every configured strategy on the configured stream, tracked in MLflow."""
    if continue_from is not None:
        set_ = [*set_, f"tracking.continue_from={continue_from}"]
    try:
        if resume is not None:
            cfg = resume_config(resume, config, set_, tracking_uri)
        else:
            cfg = load_config(config, set_)
        check_before_work(cfg)
    except (ConfigError, ValueError, LookupError) as exc:
        fail(str(exc))
    if resume is not None:
        resume_run(cfg, resume)
        return
    if cfg.flow == "multitask":
        from lifelong.flows.multitask import multitask_flow

        with in_process_flow_runs():
            print_multitask_table(multitask_flow(cfg))
        return
    if cfg.flow == "federated":
        from lifelong.flows.federated import run_federated

        with stopped_if_unhealthy():
            print_federated(run_federated(cfg))
        return
    from lifelong.flows.continual import run_continual
    from lifelong.flows.continuation import ContinuationError

    with stopped_if_unhealthy():
        try:
            result = run_continual(cfg)
        except ContinuationError as exc:
            fail(str(exc))
        print_results_table(result)


@contextlib.contextmanager
def stopped_if_unhealthy():
    """``training.health_check = "fail"``: a one-line error, not a traceback (the run is in MLflow)."""
    from lifelong.flows.health import UnhealthyModel

    try:
        yield
    except UnhealthyModel as exc:
        fail(f"{exc}; the run is marked FAILED in MLflow (`lifelong results RUN` shows why)")


def resume_config(run_id: str, config: Path | None, overrides: list[str], uri: str | None):
    """The interrupted run's own config (from its MLflow record); a given config must match it."""
    import json
    import tempfile

    from lifelong import tracking
    from lifelong.config import validate_config
    from lifelong.env import default_tracking_uri
    from lifelong.flows.continual import check_resumable, config_fingerprint

    uri = uri or default_tracking_uri()
    client = tracking.client_for(uri)
    run = client.get_run(run_id) if _run_exists(client, run_id) else None
    if run is None or run.data.tags.get("lifelong.flow") == "continual":
        check_resumable(client, run_id, uri)  # says what is wrong
    elif run.data.tags.get("lifelong.flow") != "federated":
        raise LookupError(f"--resume: run {run_id} is a {run.data.tags.get('lifelong.flow')} run; "
                          "continual and federated runs can be resumed")
    with tempfile.TemporaryDirectory() as tmp:
        stored = validate_config(json.loads(Path(client.download_artifacts(run_id, "config.json", tmp)).read_text()))
    # Results go where the interrupted run is, whatever the current defaults say.
    stored = validate_config({**stored.model_dump(mode="json"),
                              "tracking": {**stored.tracking.model_dump(mode="json"), "uri": uri}})
    if config is None and not overrides:
        return stored
    given = load_config(config, overrides)
    if config_fingerprint(given) != config_fingerprint(stored):
        raise ConfigError(f"--resume: the config given differs from run {run_id}'s own; "
                          "resume without a config to use the run's")
    return stored


def _run_exists(client, run_id: str) -> bool:
    try:
        client.get_run(run_id)
        return True
    except Exception:  # MlflowException for an unknown id
        return False


def resume_run(cfg, run_id: str) -> None:
    from lifelong.checkpoints import ResumeError
    from lifelong.flows.continual import run_continual

    try:
        with stopped_if_unhealthy():
            if cfg.flow == "federated":
                from lifelong.flows.federated import run_federated

                print_federated(run_federated(cfg, resume=run_id))
            else:
                print_results_table(run_continual(cfg, resume=run_id))
    except ResumeError as exc:
        fail(str(exc))




def print_multitask_table(result) -> None:
    cols = sorted({k for r in result.results for k in r.summary})
    typer.echo("")
    typer.echo(f"{'combiner':<20}" + "".join(f"{c:>22}" for c in cols))
    for r in result.results:
        typer.echo(f"{r.label:<20}" + "".join(f"{r.summary.get(c, float('nan')):>22.3f}" for c in cols))
    typer.echo("")
    typer.echo(f"MLflow run: {result.parent_run_id}  (store: {result.tracking_uri})")


def print_federated(result) -> None:
    cols = ["avg_accuracy", "avg_forgetting", "bwt", "min_acc", "wc_acc", "wf_10"]
    typer.echo("")
    typer.echo(f"{'strategy':<24}" + "".join(f"{c:>15}" for c in cols))
    typer.echo(f"{result.label:<24}" + "".join(
        f"{result.summary[c]:>15.3f}" if c in result.summary else f"{'n/a':>15}" for c in cols))
    extra = f"; {len(result.skipped_rounds)} rounds skipped (too few replies)" if result.skipped_rounds else ""
    typer.echo(result.cost_line or f"{result.rounds} rounds, {result.failures} client failures{extra}")
    typer.echo(f"\nMLflow run: {result.run_id}  (store: {result.tracking_uri})")
    typer.echo(f"  lifelong results {result.run_id}")


clients_app = typer.Typer(help="Federated clients: simulate them (in-process or on Ray) or deploy them.",
                          no_args_is_help=True)
app.add_typer(clients_app, name="clients")
app.add_typer(registry_app, name="registry")
app.add_typer(privacy_app, name="privacy")
app.command("schedule")(schedule_command)
app.command("audit")(audit_command)
app.command("prune")(prune_command)
app.add_typer(stack_app, name="stack")


@clients_app.command("launch")
def clients_launch(
    config: Annotated[Optional[Path], typer.Argument(help="TOML config (default: built-in defaults)")] = None,
    num_clients: Annotated[Optional[int], typer.Option("--num-clients", min=1,
                                                       help="Clients (overrides federated.clients)")] = None,
    backend: Annotated[Optional[str], typer.Option(
        help="inprocess (this process, no actors) or ray (Flower's simulation engine)")] = None,
    set_: Annotated[list[str], typer.Option("--set", help="Override a key: --set federated.rounds=3")] = [],
    deployment: Annotated[bool, typer.Option(
        "--deployment", help="Run on a real Flower deployment on this machine: a SuperLink and one "
        "SuperNode per client as separate processes, the app submitted with `flwr run`")] = False,
    workdir: Annotated[Path, typer.Option(help="--deployment: logs and Flower state go in a new folder here")] = Path(
        ".lifelong/deployment"),
    resume: Annotated[Optional[str], typer.Option(
        help="Continue an interrupted run (its MLflow run id) from its last round; with --deployment "
        "on a new local deployment")] = None,
    tracking_uri: Annotated[Optional[str], typer.Option(help="--resume: the run's MLflow store")] = None,
) -> None:
    """Run the federated flow with N simulated clients, each a continual learner on its own data."""
    if resume is not None:
        try:
            cfg = resume_config(resume, config, set_, tracking_uri)
        except (ConfigError, ValueError, LookupError) as exc:
            fail(str(exc))
        if deployment:
            deploy_and_run(cfg, None, [], workdir, resume=resume)
            return
        resume_run(cfg, resume)
        return
    overrides = ["flow=\"federated\"", *set_]
    if num_clients is not None:
        overrides.append(f"federated.clients={num_clients}")
    if backend is not None:
        overrides.append(f"federated.backend=\"{backend}\"")
    try:
        cfg = load_config(config, overrides)
        check_before_work(cfg)
    except (ConfigError, ValueError) as exc:
        fail(str(exc))
    if deployment:
        deploy_and_run(cfg, config, overrides, workdir)
        return
    from lifelong.flows.federated import run_federated

    with stopped_if_unhealthy():
        print_federated(run_federated(cfg))


def deploy_and_run(cfg, config: Path | None, overrides: list[str], workdir: Path,
                   resume: str | None = None) -> None:
    """Start a SuperLink and a SuperNode per client, submit the app, print where the results are.
    ``resume``: an interrupted run's id; its config is ``cfg`` (the run's own), sent as JSON."""
    import json
    import time

    from lifelong.cli.deploy import DeploymentError, LocalDeployment, app_dir
    from lifelong.env import default_tracking_uri

    uri = cfg.tracking.uri or default_tracking_uri()
    workdir = workdir / time.strftime("%Y%m%d-%H%M%S")  # a fresh folder: nothing of the user's is touched
    run_config = {"config": str(config.resolve()) if config else "", "set": ";".join(overrides),
                  "tracking-uri": uri}
    if resume is not None:
        from lifelong.checkpoints import ResumeError
        from lifelong.flows.checkpoints import checkpoint_file, load_round

        try:  # refused here, before any service starts, rather than in the ServerApp's log
            load_round(checkpoint_file(resume), cfg)
        except ResumeError as exc:
            fail(str(exc))
        run_config = {"config": json.dumps(cfg.model_dump(mode="json"), separators=(",", ":")),
                      "resume": resume, "tracking-uri": uri}
    n = cfg.federated.clients
    typer.echo(f"starting a SuperLink and {n} SuperNodes on 127.0.0.1 (logs: {workdir}/)")
    try:
        with LocalDeployment(workdir, num_nodes=n) as dep:
            typer.echo(f"submitting the app to the SuperLink at 127.0.0.1:{dep.port} (flwr run)")
            run = dep.run_app(app_dir(), run_config)
    except DeploymentError as exc:
        fail(str(exc), code=1)
    if run["status"] != "finished:completed":
        fail(f"Flower run {run['run-id']} {run['status']}: {run.get('status-details')} (log: {run['log']})", 1)
    from lifelong import tracking
    from lifelong.flows.federated import FLOWER_RUN_TAG

    client = tracking.client_for(uri)
    found = client.search_runs([tracking.experiment_id(client, cfg.tracking.experiment)],
                               f"tags.`{FLOWER_RUN_TAG}` = '{run['run-id']}'")
    typer.echo(f"Flower run {run['run-id']} completed (log: {run['log']})")
    if found:
        typer.echo(f"MLflow run: {found[0].info.run_id}  (store: {uri})")
        typer.echo(f"  lifelong results {found[0].info.run_id}")


@app.command()
def sweep(
    configs: Annotated[list[Path], typer.Argument(help="One or more TOML configs (e.g. configs/sweeps/*.toml)")],
    seeds: Annotated[int, typer.Option(help="Seeds 0..N-1 per config (at least 2: each row gets a 95% interval)")] = 5,
    out: Annotated[Optional[Path], typer.Option(help="Markdown file to write the tables into")] = Path(
        "docs/results.md"),
    set_: Annotated[list[str], typer.Option("--set", help="Override a key in every config")] = [],
) -> None:
    """Run every config (and each of its [[variants]]) with several seeds; write mean ± std tables
    to MLflow and a Markdown file."""
    from lifelong.flows.sweep import check_sweep, sweep_flow

    path = configs[0]
    try:  # every variant of every config, its protocol and the seed count, before the first run starts
        planned = check_sweep([str(p) for p in configs], seeds, set_)
        for path in configs:
            for _, cfg in planned[str(path)]:
                check_before_work(cfg)
    except (ConfigError, ValueError) as exc:
        fail(f"{path}: {exc}" if not str(exc).startswith(str(path)) else str(exc))

    with in_process_flow_runs():  # the cells' flows too: they run inside the sweep's
        tables = sweep_flow([str(p) for p in configs], seeds, set_, str(out) if out else None)
    for t in tables:
        typer.echo(f"\n{t.title}\n{t.markdown()}")
    if out:
        typer.echo(f"\nwritten: {out}")


def print_results_table(result) -> None:
    from lifelong.tasks.metrics import matrix_summary  # noqa: F401  (keeps the import cost out of --help)

    if getattr(result, "nothing_new", None):  # a continuation that found no new file: not an error
        typer.echo(result.nothing_new)
        return
    cols = ["avg_accuracy", "avg_forgetting", "bwt", "min_acc", "wc_acc", "wf_10"]
    typer.echo("")
    typer.echo(f"{'strategy':<16}" + "".join(f"{c:>15}" for c in cols))
    for r in result.results:
        typer.echo(f"{r.label:<16}" + "".join(
            f"{r.summary[c]:>15.3f}" if c in r.summary else f"{'n/a':>15}" for c in cols))
    typer.echo("")
    typer.echo(f"MLflow run: {result.parent_run_id}  (store: {result.tracking_uri})")
    typer.echo(f"  lifelong results {result.parent_run_id}")
    typer.echo(f"  mlflow ui --backend-store-uri {result.tracking_uri}")


@app.command()
def strategies() -> None:
    """List every component a config can name — strategies, regularisers (a strategy's plugins),
    multi-task combiners, server optimisers, clipping modes — with the paper each comes from."""
    from lifelong.catalogue import catalogue

    for s in catalogue():
        typer.echo(f"{s.name:<20} {s.kind:<16} {s.summary}")
        typer.echo(f"{'':<37} paper: {s.paper}")
        typer.echo(f"{'':<37} implementation: {s.implementation}")


@app.command()
def streams() -> None:
    """List the task streams: the embedded digits, standard benchmarks, and bring-your-own npz."""
    from lifelong.tasks.streams import describe_streams

    for name, text in describe_streams().items():
        typer.echo(f"{name:<16} {text}")


@app.command()
def results(
    run_id: Annotated[str, typer.Argument(help="An MLflow run id printed by `lifelong run`")],
    tracking_uri: Annotated[Optional[str], typer.Option(help="MLflow store (default: ./mlruns.db)")] = None,
) -> None:
    """Print the accuracy matrix and summary of a finished run (and of each strategy in it)."""
    from lifelong.flows.health import HEALTH_TAG, PROBLEMS_TAG
    from lifelong.tracking import read_results

    try:
        res = read_results(run_id, tracking_uri)
    except LookupError as exc:
        fail(str(exc))
    for r in [res, *res.children]:
        finals = {k.removeprefix("final/"): v for k, v in r.metrics.items()
                  if k.startswith("final/") and not k.startswith("final/clients_")}
        if r.matrix is None and not finals:
            if r is res and not res.children:
                typer.echo(f"run {r.run_id} ({r.name}, {r.status}) has no accuracy matrix or final metrics")
            continue
        typer.echo(f"\n{r.name}  [{r.run_id}]  {r.status}")
        if r.matrix is not None:  # a continual run; a multi-task run has final metrics only
            typer.echo(" " * 14 + "".join(f"{c:>8}" for c in r.columns))
            for label, row in zip(r.rows, r.matrix):
                typer.echo(f"{label:<14}" + "".join(f"{v:>8.3f}" for v in row))
        typer.echo("  " + "  ".join(f"{k}={v:.3f}" for k, v in sorted(finals.items())))
        if r.client_matrix is not None:
            print_per_client(r)
        if r.tags.get(HEALTH_TAG) == "unhealthy":
            typer.echo("  UNHEALTHY — the model stopped learning; these figures are not forgetting:")
            for problem in r.tags.get(PROBLEMS_TAG, "").split("; "):
                typer.echo(f"    {problem}")


def print_per_client(r) -> None:
    """The spread of a federated run's clients (accuracy on their own seen data, forgetting) and
    its five worst clients."""
    from lifelong.tasks.client_eval import rows_from_table, worst_clients

    stats = ["mean", "p10", "p50", "p90", "worst", "std"]
    typer.echo("  per client" + " " * 9 + "".join(f"{s:>8}" for s in stats))
    for what in ("acc", "forgetting"):
        values = [r.metrics.get(f"final/clients_{what}_{s}", float("nan")) for s in stats]
        typer.echo(f"  {what:<19}" + "".join(f"{v:>8.3f}" for v in values))
    worst = worst_clients(rows_from_table(r.client_matrix))
    typer.echo("  worst clients: " + ", ".join(f"client {c} (acc {a:.3f}, forgetting {f:.3f})" for c, a, f in worst))


def main() -> None:  # pragma: no cover
    app(prog_name="lifelong")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
