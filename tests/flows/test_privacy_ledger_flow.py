"""The per-client privacy ledger through a real federated run: charged every round, clients stopped
at their budget, logged to MLflow, printed by `lifelong privacy ledger`, and carried into a later
run that continues it."""

import pytest
from typer.testing import CliRunner

from lifelong.cli.main import app as cli
from lifelong.config import load_config
from lifelong.flows.federated import run_federated
from lifelong.flows.privacy_ledger import LedgerError, build_ledger, read_ledger
from lifelong.privacy.ledger import PrivacyLedger
from lifelong.tracking import client_for

pytestmark = pytest.mark.integration

# z = 1 at delta 1e-3: one round costs epsilon ~3.0, two ~4.6, three ~5.9; a budget of 5 buys two.
DP = ['privacy.clipping="flat"', "privacy.clip=1.0", "privacy.noise_multiplier=1.0", "privacy.delta=1e-3"]


def config(tmp_path, *extra):
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    return load_config(None, [
        'flow="federated"', 'model.name="mlp"', "model.hidden=16", "training.epochs=1", "stream.n_experiences=2",
        "federated.clients=3", "federated.rounds=2", 'strategies=[{name="naive"}]', f'tracking.uri="{uri}"',
        'tracking.experiment="ledger"', "tracking.log_model=false", 'training.health_check="off"', *DP, *extra])


def test_the_ledger_stops_clients_at_their_budget_and_carries_into_the_next_run(tmp_path):
    first = run_federated(config(tmp_path, "privacy.client_budget=5.0"))
    uri = first.tracking_uri
    saved = PrivacyLedger.from_json(read_ledger(first.run_id, uri))
    # every client took part in rounds 1 and 2, then could not afford a third: rounds 3, 4 skipped
    assert [saved.participations(c) for c in range(3)] == [2, 2, 2]
    assert {(r, c) for r, c, _ in saved.stops} == {(3, 0), (3, 1), (3, 2)}
    assert first.skipped_rounds == [3, 4]
    assert all(saved.spent(c) <= 5.0 for c in range(3))
    history = client_for(uri).get_metric_history(first.run_id, "privacy/client_epsilon_max")
    assert [m.step for m in history] == [1, 2, 3, 4] and history[-1].value == pytest.approx(saved.spent(0))
    artifacts = {a.path for a in client_for(uri).list_artifacts(first.run_id)}
    assert {"privacy_ledger.json", "privacy_ledger.png"} <= artifacts

    out = CliRunner().invoke(cli, ["privacy", "ledger", first.run_id, "--tracking-uri", uri])
    assert out.exit_code == 0, out.output
    assert "3 clients, delta 0.001, default budget 5" in out.output
    assert "clients at their limit: 3" in out.output and "before round 3" in out.output

    # A later run continues the ledger: clients 0 and 1 are spent; client 2 gets a budget of 10.
    (tmp_path / "budgets.csv").write_text("client,epsilon\n2,10\n")
    second = run_federated(config(tmp_path, "privacy.client_budget=5.0", f'privacy.ledger_from="{first.run_id}"',
                                  f'privacy.client_budgets="{tmp_path / "budgets.csv"}"', "seed=1"))
    both = PrivacyLedger.from_json(read_ledger(second.run_id, uri))
    runs = {c: [e.run for e in both.entries if e.client == c] for c in range(3)}
    assert runs[0] == runs[1] == [first.run_id] * 2  # nothing more for the spent clients
    assert runs[2][:2] == [first.run_id] * 2 and len(runs[2]) > 2 and both.spent(2) <= 10.0
    assert not both.can_take_part(2, 1.0)  # it stopped because the next round would exceed 10

    # bad input is refused before any round
    with pytest.raises(LedgerError, match="privacy.ledger_from: no MLflow run 'nope'"):
        build_ledger(config(tmp_path, 'privacy.ledger_from="nope"'))
    with pytest.raises(LedgerError, match="delta"):
        build_ledger(config(tmp_path, f'privacy.ledger_from="{first.run_id}"', "privacy.delta=1e-4"))
    (tmp_path / "bad.json").write_text('{"5": 1}')
    with pytest.raises(LedgerError, match=r"clients \[5\]"):
        build_ledger(config(tmp_path, f'privacy.client_budgets="{tmp_path / "bad.json"}"'))


def test_the_clients_own_records_keep_a_new_run_from_resetting_their_budgets(tmp_path, monkeypatch):
    """A second run of the same clients that does not continue the first's ledger (no
    privacy.ledger_from): with client records, each client reports the rounds it spent in the
    first, which are charged; none can afford another round, so nothing of theirs is used. Without
    them, the same run starts every client at zero."""
    from lifelong.bridges.flower.dp_fedavg import CLIENT_RECORD
    from lifelong.clients import privacy_record

    monkeypatch.setenv("LIFELONG_CLIENT_STATE_DIR", str(tmp_path / "clients"))
    records = ["privacy.client_budget=5.0", "privacy.client_records=true"]
    first = run_federated(config(tmp_path, *records))
    second = run_federated(config(tmp_path, *records))
    uri = first.tracking_uri
    ledger = PrivacyLedger.from_json(read_ledger(second.run_id, uri))
    assert second.skipped_rounds == [1, 2, 3, 4]  # every client's update of round 1 dropped, then none sampled
    for c in range(3):
        assert [e.run for e in ledger.entries if e.client == c] == [CLIENT_RECORD] * 2
        assert ledger.spent(c) == pytest.approx(PrivacyLedger.from_json(read_ledger(first.run_id, uri)).spent(c))
    assert sorted((r, c) for r, c, _ in ledger.stops) == [(1, 0), (1, 1), (1, 2)]
    # Each client's record: the first run's two rounds, and the round it sent in the second
    # (recorded when sent: an upper bound of what the server used).
    key = privacy_record.population_key(config(tmp_path))
    assert [len(privacy_record.prior_rounds(tmp_path / "clients", key, c, [])) for c in range(3)] == [3, 3, 3]

    third = run_federated(config(tmp_path, "privacy.client_budget=5.0", "privacy.client_records=false"))
    assert third.skipped_rounds == [3, 4]  # the budgets start from zero: what the records prevent


def test_ledger_keys_need_user_level_dp():
    from lifelong.config import ConfigError

    with pytest.raises(ConfigError, match="privacy.client_budget: the per-client ledger accounts user-level DP"):
        load_config(None, ['flow="federated"', "privacy.client_budget=1.0"])


def test_the_cli_refuses_a_run_without_a_ledger(tmp_path):
    uri = f"sqlite:///{tmp_path / 'x.db'}"
    client_for(uri)
    out = CliRunner().invoke(cli, ["privacy", "ledger", "nope", "--tracking-uri", uri])
    assert out.exit_code == 2 and "no MLflow run 'nope'" in out.output
