"""The per-client privacy ledger of a federated run: built before the run, logged with it, read back.

The account itself is ``privacy/ledger.py``; the server charges it in
``bridges/flower/dp_fedavg.py``. Here: the ledger a run starts from (empty, or an earlier run's,
``privacy.ledger_from``) with the config's budgets; its per-round metrics; the artifact
``privacy_ledger.json`` and the figure ``privacy_ledger.png`` at the end; and reading it back for
``lifelong privacy ledger RUN``.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np

from lifelong import tracking
from lifelong.config import Config
from lifelong.env import default_tracking_uri
from lifelong.privacy.ledger import LEDGER_FILE, PrivacyLedger, read_budgets

FIGURE_FILE = "privacy_ledger.png"


class LedgerError(ValueError):
    """A ledger that cannot be built as configured; the message names the key."""


def build_ledger(cfg: Config) -> PrivacyLedger | None:
    """The ledger this run charges (None without user-level DP). Bad budgets or an earlier run
    without a ledger are refused here, before any round."""
    p = cfg.privacy
    if p.clipping == "off":
        return None
    clients = cfg.federated.clients
    try:
        budgets = read_budgets(Path(p.client_budgets), clients) if p.client_budgets is not None else None
    except ValueError as exc:
        raise LedgerError(str(exc)) from None
    if p.ledger_from is None:
        return PrivacyLedger(p.delta, p.client_budget, budgets or {})
    saved = read_ledger(p.ledger_from, cfg.tracking.uri or default_tracking_uri(), key="privacy.ledger_from")
    try:
        ledger = PrivacyLedger.from_json(saved, budget=p.client_budget, budgets=budgets, delta=p.delta)
    except ValueError as exc:
        raise LedgerError(f"privacy.ledger_from: {exc}") from None
    unknown = sorted({e.client for e in ledger.entries if e.client >= clients})
    if unknown:
        raise LedgerError(f"privacy.ledger_from: run {p.ledger_from} has clients {unknown[:5]}, not among this "
                          f"run's {clients}; continue a ledger with the same clients")
    ledger.stops = []  # budgets may have changed: who is at the limit is decided again, round by round
    return ledger


def read_ledger(run_id: str, uri: str, key: str = "RUN") -> dict:
    """A run's saved ledger (JSON), or a ``LedgerError`` naming ``key``."""
    client = tracking.client_for(uri)
    try:
        client.get_run(run_id)
    except Exception:  # noqa: BLE001  (MlflowException for unknown ids, connection errors for bad URIs)
        raise LedgerError(f"{key}: no MLflow run {run_id!r} in {uri}") from None
    with tempfile.TemporaryDirectory() as tmp:
        try:
            path = client.download_artifacts(run_id, LEDGER_FILE, tmp)
        except Exception:  # noqa: BLE001  (the stores raise different errors for a missing artifact)
            raise LedgerError(f"{key}: run {run_id} has no {LEDGER_FILE} (it did not run user-level DP, "
                              "or it stopped before its end)") from None
        return json.loads(Path(path).read_text())


def round_values(ledger: PrivacyLedger, clients: int) -> dict[str, float]:
    """Per-round metrics: the spread of the clients' spent epsilon and how many are at their limit."""
    values = {f"privacy/client_epsilon_{k}": v for k, v in ledger.percentiles(clients).items()}
    values["privacy/clients_at_limit"] = float(len(ledger.at_limit(clients)))
    return values


def log_ledger(client, run_id: str, ledger: PrivacyLedger, clients: int, plots: bool) -> None:
    client.log_dict(run_id, {**ledger.to_json(), "clients": ledger.table(clients)}, LEDGER_FILE)
    if plots:
        tracking.log_figure(client, run_id, ledger_figure(ledger, clients), FIGURE_FILE)


def ledger_figure(ledger: PrivacyLedger, clients: int):
    """Each client's spent epsilon over rounds (one line each, budgets dashed)."""
    plt = tracking.pyplot()

    fig, ax = plt.subplots(figsize=(7, 4))
    # Server steps in the order they were charged: a continued ledger's rounds restart at 1, so
    # (run, round) in order of first appearance, numbered 1, 2, ... across runs.
    steps: dict[tuple[str, int], list] = {}
    for e in ledger.entries:
        steps.setdefault((e.run, e.round), []).append(e)
    rounds = list(range(1, len(steps) + 1))
    account = PrivacyLedger(ledger.delta)
    curves = np.zeros((clients, len(rounds)))
    for j, group in enumerate(steps.values()):
        for e in group:
            account.record(e.client, e.run, e.experience, e.round, e.noise_multiplier)
        curves[:, j] = [account.spent(c) for c in range(clients)]
    for c in range(clients):
        ax.plot(rounds, curves[c], lw=0.8, alpha=0.6 if clients > 20 else 0.9)
    for b in sorted({ledger.budget_of(c) for c in range(clients)} - {None}):
        ax.axhline(b, ls="--", color="k", lw=0.8)
    ax.set_xlabel("server step that charged a client (across continued runs)")
    ax.set_ylabel(f"spent epsilon (delta={ledger.delta:g})")
    ax.set_title(f"per-client privacy ledger: {clients} clients")
    fig.tight_layout()
    return fig
