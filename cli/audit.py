"""``lifelong audit CONFIG.toml``: the privacy audit of a federated config (see flows/privacy_audit.py).

A command of its own file so the main command stays small; ``cli/main.py`` registers it with
``app.command("audit")(audit)``. Torch, MLflow and the flow are imported inside the command, so
``lifelong --help`` stays fast. Bad input (a config that is not federated, too many samples, an
invalid config) is one red line and exit 2, as ``lifelong run`` does.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from lifelong.cli.common import fail


def audit(
    config: Annotated[Path, typer.Argument(help="A federated TOML config, with a [privacy] section to audit DP")],
    samples: Annotated[int, typer.Option(min=1, max=64, help="Samples in the attacked batch (DLG works with 1-4)")] = 4,
    iterations: Annotated[int, typer.Option(min=1, help="Optimisation steps of the attack")] = 300,
    labels: Annotated[str, typer.Option(help="idlg (labels read off the last layer) or dlg (optimised)")] = "idlg",
    distance: Annotated[str, typer.Option(help="cosine (Geiping et al.) or l2 (DLG)")] = "cosine",
    optimizer: Annotated[str, typer.Option(help="adam or lbfgs (DLG; ~10x slower per step)")] = "adam",
    set_: Annotated[list[str], typer.Option("--set", help="Override a key: --set privacy.noise_multiplier=1.0")] = [],
) -> None:
    """Attack one client's update with gradient inversion (DLG/iDLG), without and with DP."""
    from lifelong.config import ConfigError, load_config

    for name, value, allowed in (("--labels", labels, ("idlg", "dlg")), ("--distance", distance, ("cosine", "l2")),
                                 ("--optimizer", optimizer, ("adam", "lbfgs"))):
        if value not in allowed:
            fail(f"{name}: {value!r} is not one of {', '.join(allowed)}")
    try:
        cfg = load_config(config, set_)
        from lifelong.flows.privacy_audit import AttackSettings, check_auditable

        check_auditable(cfg)
    except (ConfigError, ValueError) as exc:
        fail(str(exc))
    from lifelong.flows.privacy_audit import run_audit

    try:
        result = run_audit(cfg, AttackSettings(samples, iterations, labels, distance, optimizer))
    except ValueError as exc:  # AuditError (too few samples), an impossible privacy budget
        fail(str(exc))
    print_audit(result)


def print_audit(result) -> None:
    for note in result.notes:
        typer.echo(f"note: {note}")
    typer.echo("")
    typer.echo(f"{'case':<34}{'MSE':>10}{'PSNR (dB)':>12}{'label acc':>12}")
    for c in result.cases:
        typer.echo(f"{c.description:<34}{c.score.mse:>10.4f}{c.score.psnr:>12.2f}{c.score.label_accuracy:>12.2f}")
    typer.echo(f"{'reference: the mean image':<34}{'':>10}{result.reference_psnr:>12.2f}{'':>12}")
    typer.echo(f"\ntrue labels {result.y_true.tolist()}; "
               + "; ".join(f"{c.name}: {c.reconstruction.y.tolist()}" for c in result.cases))
    typer.echo(f"\nMLflow run: {result.run_id}  (store: {result.tracking_uri}; images: audit.png)")
