"""``lifelong registry``: list, show, promote and compare registered models (see lifelong/registry.py).

A typer sub-app of its own file so the main command stays small; ``cli/main.py`` mounts it.
MLflow is imported inside the commands, as in ``cli/main.py``, so ``lifelong --help`` stays fast.
Every command makes one attempt at a tracking server (:func:`lifelong.registry.fail_fast`) and
turns registry errors into one red line: exit 1 when the store cannot be reached, 2 for bad input
(a malformed reference or alias, an unknown model, version or alias — as ``lifelong results``
does for an unknown run).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, TypeVar

import typer

from lifelong.cli.common import fail

registry_app = typer.Typer(help="The MLflow model registry: each finished run's model as a version of its "
                                "lineage (lifelong-<flow>-<stream>-<strategy>), with aliases 'candidate' "
                                "(newest) and 'champion' (moved by the config's gates or by hand).",
                           no_args_is_help=True)

TrackingUri = Annotated[str | None, typer.Option(
    "--tracking-uri", help="MLflow store (default: $MLFLOW_TRACKING_URI or ./mlruns.db)")]
T = TypeVar("T")


def _call(fn: Callable[[], T]) -> T:
    from lifelong import registry

    try:
        with registry.fail_fast():
            return fn()
    except registry.StoreUnavailable as exc:
        fail(str(exc), 1)
    except (registry.RegistryInputError, registry.RegistryLookupError) as exc:
        fail(str(exc), 2)
    except registry.RegistryError as exc:
        fail(str(exc), 1)


def _table(headers: list[str] | None, rows: list[list[str]]) -> None:
    """Left-aligned columns two spaces apart (``headers=None``: no header line)."""
    lines = [headers, *rows] if headers else rows
    widths = [max(len(str(x)) for x in col) for col in zip(*lines)]
    for row in lines:
        typer.echo("  ".join(str(x).ljust(w) for x, w in zip(row, widths)).rstrip())


def _num(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.4f}"


def _when(info) -> str:
    return info.created.strftime("%Y-%m-%d %H:%M") if info.created else ""


@registry_app.command("list")
def list_(
    model: Annotated[str | None, typer.Option("--model", help="Only this registered model")] = None,
    tracking_uri: TrackingUri = None,
) -> None:
    """Every registered version, newest first: aliases, what it learned, its headline metrics."""
    from lifelong import registry

    versions = _call(lambda: registry.list_models(tracking_uri, model))
    if not versions:
        typer.echo("no registered models")
        return
    metrics = registry.ordered_metrics({k for v in versions for k in v.metrics})[:3]
    _table(["model", "version", "aliases", "created", "strategy", "stream", *metrics, "run"],
           [[v.name, v.version, ",".join(v.aliases), _when(v), v.tags.get("strategy", ""),
             v.tags.get("stream", ""), *(_num(v.metrics.get(m)) for m in metrics), v.run_id or ""]
            for v in versions])


@registry_app.command()
def show(
    ref: Annotated[str, typer.Argument(help="NAME (latest version), NAME@ALIAS or NAME/VERSION")],
    tracking_uri: TrackingUri = None,
) -> None:
    """One version: aliases, lineage (MLflow run), tags, metrics, config."""
    from lifelong import registry

    v = _call(lambda: registry.show(tracking_uri, ref))
    typer.echo(f"{v.name} version {v.version}" + (f"  [{', '.join(v.aliases)}]" if v.aliases else ""))
    run = f"{v.run_id} ({v.run_name}, {v.run_status})" if v.run_id else "none"
    rows = [["created", _when(v)], ["source", v.source], ["run", run]]
    rows += [[k, val] for k, val in sorted(v.tags.items())]
    if v.promotion:
        rows.append(["promotion", v.promotion])
    _table(None, rows)
    if v.metrics:
        typer.echo("\nmetrics")
        _table(["  metric", "value"],
               [[f"  {k}", _num(v.metrics[k])] for k in registry.ordered_metrics(v.metrics)])
    if v.config:
        typer.echo(f"\nconfig ({len(v.config)} keys)")
        _table(["  key", "value"], [[f"  {k}", val] for k, val in sorted(v.config.items())])


@registry_app.command()
def promote(
    name: Annotated[str, typer.Argument(help="Registered model, e.g. lifelong-continual-split_digits-replay")],
    version: Annotated[str, typer.Argument(help="A version number, or an alias such as candidate")],
    alias: Annotated[str, typer.Option("--alias", help="The alias to point at VERSION")] = "champion",
    check: Annotated[bool, typer.Option("--check", help="Only show what the version's gates decide against "
                                                        "today's champion; change nothing")] = False,
    tracking_uri: TrackingUri = None,
) -> None:
    """Point an alias (default: champion) at a version. Moving champion by hand past failing gates
    is recorded on the version as a manual override; --check shows the gates' decision only."""
    from lifelong import registry

    if check:
        c = _call(lambda: registry.check_promotion(tracking_uri, name, version))
        held = f"v{c.champion.version}" if c.champion else "none"
        typer.echo(f"{name} v{c.version.version} against {registry.CHAMPION} {held}:")
        for r in c.results:
            typer.echo(f"  {'pass' if r.passed else 'FAIL'}  {r.gate:<32}  {r.reason}")
        typer.echo(f"decision: {'would be promoted' if c.passed else 'would not be promoted'} ({c.reason}); "
                   "nothing changed")
        return
    v = _call(lambda: registry.promote(tracking_uri, name, version, alias))
    typer.echo(f"{v.name} version {v.version} is now {alias!r}  (aliases: {', '.join(v.aliases)})")
    if v.promotion and v.promotion.startswith("manual override"):
        typer.secho(f"recorded: {v.promotion}", fg=typer.colors.YELLOW)


@registry_app.command()
def lineage(
    name: Annotated[str, typer.Argument(help="Registered model (a lineage), e.g. lifelong-continual-split_digits-replay")],
    tracking_uri: TrackingUri = None,
) -> None:
    """A lineage's versions in order: parent, experiences learned, the gates' decision, and the
    accuracy matrix the versions' final rows make (one row per version)."""
    from lifelong import registry

    versions = _call(lambda: registry.lineage(tracking_uri, name))
    if not versions:
        typer.echo(f"{name}: no versions")
        return
    rows, width = [], 0
    for v in versions:
        f = registry.lineage_fields(v)
        gates = f["gates"]
        verdict = ("-" if not gates else f"{sum(g['passed'] for g in gates)}/{len(gates)} passed")
        rows.append([f"v{v.version}", ",".join(v.aliases), f"v{f['parent']}" if f["parent"] else "-",
                     str(len(f["experiences"] or [])), verdict, _when(v), v.run_id or ""])
        width = max(width, len(f["final_row"] or []))
    _table(["version", "aliases", "parent", "experiences", "gates", "created", "run"], rows)
    typer.echo("\naccuracy on each experience after each version (final rows)")
    # The columns are the experiences of the version that learned the most (a folder stream's file names).
    longest = max((registry.lineage_fields(v)["experiences"] or [] for v in versions), key=len)
    heads = [str(e).removesuffix(".npz") for e in longest] if len(longest) == width else \
        [f"exp{i}" for i in range(width)]
    _table(["  version", *heads, "avg"],
           [[f"  v{v.version}", *(_num(x) for x in (registry.lineage_fields(v)["final_row"] or [])),
             *([""] * (width - len(registry.lineage_fields(v)["final_row"] or []))),
             _num(v.metrics.get("avg_accuracy"))] for v in versions])
    for v in versions:
        if v.promotion:
            typer.echo(f"v{v.version}: {v.promotion}")


@registry_app.command()
def compare(
    name: Annotated[str, typer.Argument(help="Registered model, e.g. lifelong-continual-split_digits-replay")],
    v1: Annotated[str, typer.Argument(help="A version number or an alias")],
    v2: Annotated[str, typer.Argument(help="A version number or an alias")],
    tracking_uri: TrackingUri = None,
) -> None:
    """Two versions side by side: metrics, and the config keys that differ."""
    from lifelong import registry

    c = _call(lambda: registry.compare(tracking_uri, name, v1, v2))
    a, b = f"v{c.a.version}", f"v{c.b.version}"
    typer.echo(f"{name}: {a} ({c.a.run_name or c.a.run_id}) vs {b} ({c.b.run_name or c.b.run_id})\n")
    _table(["metric", a, b, f"{b} - {a}"],
           [[k, _num(x), _num(y), "" if x is None or y is None else f"{y - x:+.4f}"]
            for k, (x, y) in c.metrics.items()])
    if not c.a.config and not c.b.config:
        typer.echo("\nconfig: not recorded")
    elif not c.config:
        typer.echo(f"\nconfig: identical ({len(c.a.config)} keys)")
    else:
        typer.echo(f"\nconfig keys that differ ({len(c.config)})")
        _table(["key", a, b], [[k, "-" if x is None else x, "-" if y is None else y]
                               for k, (x, y) in c.config.items()])
