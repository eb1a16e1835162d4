"""``lifelong privacy ledger RUN``: every client's spent epsilon in a federated run (flows/privacy_ledger.py).

A typer sub-app of its own file so the main command stays small; ``cli/main.py`` mounts it. MLflow
and the flow are imported inside the command, so ``lifelong --help`` stays fast. An unknown run,
or one without a ledger (no user-level DP), is one red line and exit 2.
"""

from __future__ import annotations

from typing import Annotated

import typer

from lifelong.cli.common import fail

privacy_app = typer.Typer(help="User-level DP: each client's privacy ledger.", no_args_is_help=True)


@privacy_app.command("ledger")
def ledger(
    run_id: Annotated[str, typer.Argument(help="A federated run with user-level DP (its MLflow run id)")],
    tracking_uri: Annotated[str | None, typer.Option(help="MLflow store (default: ./mlruns.db)")] = None,
    all_clients: Annotated[bool, typer.Option("--all", help="One line per client (default: the spread "
                                                           "and the clients at their limit)")] = False,
) -> None:
    """Print each client's spent epsilon at the run's delta: the spread, the clients at their limit."""
    from lifelong.env import default_tracking_uri
    from lifelong.flows.privacy_ledger import LedgerError, read_ledger
    from lifelong.privacy.ledger import PrivacyLedger

    try:
        saved = read_ledger(run_id, tracking_uri or default_tracking_uri())
    except LedgerError as exc:
        fail(str(exc))
    account = PrivacyLedger.from_json(saved)
    rows = saved["clients"]
    clients = len(rows)
    p = account.percentiles(clients)
    budget = "none" if account.budget is None else f"{account.budget:g}"
    runs = sorted({e.run for e in account.entries})
    typer.echo(f"privacy ledger of run {run_id}: {clients} clients, delta {account.delta:g}, default budget "
               f"{budget}{f', {len(account.budgets)} per-client budgets' if account.budgets else ''}; "
               f"{len(account.entries)} participations over {len(runs)} run(s)")
    typer.echo("spent epsilon   " + "  ".join(f"{k} {v:.3f}" for k, v in p.items()))
    shown = rows if all_clients else [r for r in rows if r["stopped_at_round"] is not None]
    if not all_clients:
        typer.echo(f"clients at their limit: {len(shown)}" + ("" if shown else " (none)"))
    if shown:
        typer.echo(f"{'client':>8}{'rounds':>8}{'epsilon':>10}{'budget':>10}  stopped")
        for r in shown:
            b = "-" if r["budget"] is None else f"{r['budget']:g}"
            stopped = "" if r["stopped_at_round"] is None else f"before round {r['stopped_at_round']}"
            typer.echo(f"{r['client']:>8}{r['participations']:>8}{r['epsilon']:>10.3f}{b:>10}  {stopped}")
