"""``lifelong audit CONFIG.toml [--privacy]``: the privacy audits of a federated config.

Without ``--privacy``: the gradient-inversion attack on one client's update (flows/privacy_audit.py).
With it: first the empirical audit of the user-level DP guarantee with canary clients in one run
(flows/canary_audit.py: an epsilon lower bound set beside the accountant's claim), then the
gradient-inversion attack, so the two reports sit side by side.

A command of its own file so the main command stays small; ``cli/main.py`` registers it with
``app.command("audit")(audit)``. Torch, MLflow and the flow are imported inside the command, so
``lifelong --help`` stays fast. Bad input (a config that is not federated, too many samples, an
invalid config) is one red line and exit 2, as ``lifelong run`` does. ``--certify`` turns a
VIOLATION verdict into exit 1 (before the attack runs), for a CI job or a release gate.
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
    privacy: Annotated[bool, typer.Option("--privacy", help="Also audit the DP guarantee empirically with canary "
                                                            "clients (Steinke et al. 2023)")] = False,
    canaries: Annotated[int, typer.Option(help="--privacy: canaries, each included with probability 1/2")] = 1000,
    significance: Annotated[float, typer.Option(help="--privacy: the bound holds with probability 1 - this")] = 0.05,
    certify: Annotated[bool, typer.Option("--certify", help="--privacy: exit 1 when the audit proves more leakage "
                                                            "than the accountant claims (a release gate, a CI job)")] = False,
) -> None:
    """Attack one client's update with gradient inversion (DLG/iDLG), without and with DP; with
    --privacy, first audit the DP guarantee with canary clients."""
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

    if certify and not privacy:
        fail("--certify: it certifies the canary audit's verdict; add --privacy")
    if privacy:
        from lifelong.flows.canary_audit import check_canary_audit, run_canary_audit

        try:
            check_canary_audit(cfg, canaries, significance, certify)
            result = run_canary_audit(cfg, canaries, significance)
        except ValueError as exc:  # an impossible privacy budget, bad audit settings
            fail(str(exc))
        print_canary_audit(result)
        if certify and not result.consistent:
            typer.secho(f"certification failed: the audit proves epsilon >= {result.empirical_epsilon:.3f}, more than "
                        f"the {result.claimed_epsilon:.3f} the accountant claims", fg="red", err=True)
            raise typer.Exit(1)
        typer.echo("")
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


def print_canary_audit(r) -> None:
    for note in r.notes:
        typer.echo(f"note: {note}")
    typer.echo(f"canary audit (Steinke et al. 2023, one run): {r.canaries} canary clients, {r.included} included; "
               f"{r.clients} other clients; {r.sampled} of {r.clients + r.included} sampled a round; {r.rounds} rounds")
    claim = ("no DP: nothing claimed" if r.claimed_epsilon is None else
             f"claimed epsilon {r.claimed_epsilon:.3f} at delta {r.delta:g} (accountant, z = {r.noise_multiplier:.3g})")
    typer.echo(f"  {claim}")
    typer.echo(f"  empirical epsilon >= {r.empirical_epsilon:.3f} with confidence {1 - r.significance:.0%} "
               f"(mean score: included {r.mean_score_in:.3g}, left out {r.mean_score_out:.3g})")
    if r.consistent is not None:
        typer.echo("  verdict: consistent — the audit proves no more leakage than claimed" if r.consistent else
                   "  verdict: VIOLATION — the run leaks more than the accountant claims")
    typer.echo(f"  MLflow run: {r.run_id}  (store: {r.tracking_uri}; canary_scores.png)")
