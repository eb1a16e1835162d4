"""`lifelong audit`: refusals, the attacked update is a real client's, and an end-to-end MLflow run."""

import json
from pathlib import Path

import pytest
import torch
import typer
from flwr.app import RecordDict
from mlflow import MlflowClient
from typer.testing import CliRunner

from lifelong.cli.audit import audit
from lifelong.config import load_config
from lifelong.flows.privacy_audit import (
    AttackSettings,
    AuditError,
    attack_cases,
    check_auditable,
    run_audit,
    target_batch,
)
from lifelong.privacy.gradient_inversion import sgd_update

app = typer.Typer(pretty_exceptions_enable=False)
app.command("audit")(audit)
app.command("other")(lambda: None)  # two commands: typer then dispatches by name, as in lifelong.cli.main
runner = CliRunner()

FEDERATED = """
seed = 0
flow = "federated"
[stream]
name = "split_digits"
n_experiences = 5
[model]
name = "mlp"
hidden = 32
[training]
lr = 0.05
[federated]
clients = 10
[[strategies]]
name = "naive"
[privacy]
clipping = "flat"
clip = 1.0
noise_multiplier = 1.0
"""


def _config(tmp_path, text=FEDERATED):
    path = tmp_path / "cfg.toml"
    path.write_text(text + f'\n[tracking]\nuri = "sqlite:///{tmp_path / "mlflow.db"}"\nexperiment = "audit-test"\n')
    return path


def test_a_non_federated_config_is_refused_clearly(tmp_path):
    out = runner.invoke(app, ["audit", str(_config(tmp_path, '[[strategies]]\nname = "naive"\n'))])
    assert out.exit_code == 2
    assert 'not "federated"' in out.output and "[privacy]" in out.output
    assert "Traceback" not in out.output


def test_a_task_stream_is_refused_clearly(tmp_path):
    cfg = load_config(_config(tmp_path), ['stream.scenario="task"'])
    with pytest.raises(AuditError, match="multi-head model"):
        check_auditable(cfg)


def test_without_privacy_only_the_no_dp_case_is_audited(tmp_path):
    cfg = load_config(_config(tmp_path), ['privacy.clipping="off"'])
    assert "only the no-DP case" in " ".join(check_auditable(cfg))
    assert [name for name, _, _ in attack_cases(cfg)] == ["no_dp"]
    with pytest.raises(AuditError, match="fewer than 500"):
        target_batch(cfg, 500)


def test_the_attacked_update_is_what_a_one_step_client_sends(tmp_path):
    """With one plain SGD step on a share that fits one batch, ClientLearner's real update equals
    the audit's ``-lr * grad`` on that share (the attacker's model of the client is exact)."""
    from lifelong.clients.learner import ClientLearner
    from lifelong.flows.federated import initial_weights
    from lifelong.tasks.partition import client_indices

    cfg = load_config(_config(tmp_path), ["federated.clients=100", "training.epochs=1", "training.batch_size=16",
                                          'training.optimizer="sgd"', "training.momentum=0.0"])
    model, _, _, stream = target_batch(cfg, 1)
    idx = client_indices(cfg, stream, 0)[0]
    assert len(idx) <= cfg.training.batch_size
    x, y, _ = stream.train_tensors(0)
    expected = sgd_update(model, x[idx], y[idx], cfg.training.lr)
    start = initial_weights(cfg)
    new, _ = ClientLearner(cfg, 0, RecordDict()).train_round(start, 0, 1)
    names = [n for n, _ in model.named_parameters()]
    for name, e in zip(names, expected):
        assert torch.allclose(new[name] - start[name], e, atol=1e-6), name


def test_audit_end_to_end_logs_a_run_with_the_image(tmp_path):
    path = _config(tmp_path)
    out = runner.invoke(app, ["audit", str(path), "--samples", "1", "--iterations", "100"])
    assert out.exit_code == 0, out.output
    assert "no DP (raw update)" in out.output and "DP (flat, C=1, z=1)" in out.output
    run_id = out.output.split("MLflow run: ")[1].split()[0]
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    m = run.data.metrics
    assert m["no_dp/psnr"] > 20 and m["dp/psnr"] < 10 and m["no_dp/label_accuracy"] == 1.0
    assert run.data.params["audit.samples"] == "1" and run.data.params["privacy.noise_multiplier"] == "1.0"
    arts = {a.path for a in client.list_artifacts(run_id)}
    assert {"audit.png", "audit.json"} <= arts
    data = json.loads(Path(client.download_artifacts(run_id, "audit.json", str(tmp_path))).read_text())
    assert [c["name"] for c in data["cases"]] == ["no_dp", "clip_only", "dp"]
    # Seeded: the same config and seed give the same numbers.
    again = run_audit(load_config(path), AttackSettings(samples=1, iterations=100))
    assert [c.score.mse for c in again.cases] == [c["mse"] for c in data["cases"]]
