"""Checkpoints after every experience; `lifelong run --resume` continues into the same MLflow run."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import lifelong.flows.continual as fc
from lifelong.cli.main import app as cli
from lifelong.config import load_config
from lifelong.tracking import client_for

pytestmark = [pytest.mark.integration, pytest.mark.heavy]

STRATEGIES = 'strategies=[{name="naive"}, {name="replay", mem_size=40, plugins=[{name="ewc", lam=5.0}]}]'


def overrides(tmp_path, *extra):
    return ['model.name="mlp"', "model.hidden=32", "training.epochs=2", STRATEGIES,
            f'tracking.uri="sqlite:///{tmp_path / "mlruns.db"}"', "tracking.log_model=false",
            "tracking.log_plots=false", *extra]


def latest_parent(uri: str) -> str:
    client = client_for(uri)
    exp = client.get_experiment_by_name("lifelong").experiment_id
    runs = client.search_runs([exp], "tags.`lifelong.flow` = 'continual'", order_by=["attributes.start_time DESC"])
    return next(r.info.run_id for r in runs if "mlflow.parentRunId" not in r.data.tags)


def interrupted_run(cfg, monkeypatch, label="replay+ewc", at=3) -> str:
    original = fc.train_experience

    def failing(learner, i):
        if learner.label == label and i == at:
            raise RuntimeError("power cut")
        return original.fn(learner, i)

    monkeypatch.setattr(fc, "train_experience", failing)
    with pytest.raises(RuntimeError, match="power cut"):
        fc.run_continual(cfg)
    monkeypatch.setattr(fc, "train_experience", original)
    return latest_parent(cfg.tracking.uri)


def test_resumed_run_matches_an_uninterrupted_one(tmp_path, monkeypatch):
    cfg = load_config(None, overrides(tmp_path))
    full = fc.run_continual(cfg)
    parent = interrupted_run(cfg, monkeypatch)
    client = client_for(cfg.tracking.uri)
    assert client.get_run(parent).info.status == "FAILED"
    assert torch.load(fc.checkpoint_path(parent, 1), weights_only=False)["next_experience"] == 3
    resumed = fc.run_continual(cfg, resume=parent)
    assert resumed.parent_run_id == parent and client.get_run(parent).info.status == "FINISHED"
    for a, b in zip(full.results, resumed.results, strict=True):
        assert a.label == b.label and np.array_equal(a.matrix, b.matrix)
        assert a.summary == pytest.approx(b.summary)
    children = client.search_runs([client.get_run(parent).info.experiment_id],
                                  f"tags.`mlflow.parentRunId` = '{parent}'")
    assert len(children) == 2  # the interrupted strategy went on in its own run


def test_checkpoint_of_another_config_is_refused(tmp_path, monkeypatch):
    cfg = load_config(None, overrides(tmp_path))
    parent = interrupted_run(cfg, monkeypatch)
    other = load_config(None, overrides(tmp_path, "training.lr=0.01"))
    with pytest.raises(fc.ResumeError, match=r"different config \(differs in: training.lr\)"):
        fc.run_continual(other, resume=parent)
    out = CliRunner().invoke(cli, ["run", "--resume", parent, "--tracking-uri", cfg.tracking.uri,
                                   "--set", "training.lr=0.01", *sum((["--set", o] for o in overrides(tmp_path)), [])])
    assert out.exit_code == 2 and "differs from run" in out.output


def test_corrupt_checkpoint_is_refused(tmp_path, monkeypatch):
    cfg = load_config(None, overrides(tmp_path))
    parent = interrupted_run(cfg, monkeypatch)
    fc.checkpoint_path(parent, 1).write_bytes(b"not a checkpoint")
    out = CliRunner().invoke(cli, ["run", "--resume", parent, "--tracking-uri", cfg.tracking.uri])
    assert out.exit_code == 2 and "is unreadable" in out.output and "Traceback" not in out.output


def test_unknown_run_is_refused(tmp_path):
    out = CliRunner().invoke(cli, ["run", "--resume", "0" * 32, "--tracking-uri", f"sqlite:///{tmp_path / 'x.db'}"])
    assert out.exit_code == 2 and "no MLflow run" in out.output


def test_a_killed_process_resumes_to_the_same_final_metrics(tmp_path):
    """The real thing: SIGKILL a `lifelong run` mid-experience, then `lifelong run --resume`."""
    cfg_path = tmp_path / "run.toml"
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    cfg_path.write_text(
        'seed = 3\n[model]\nname = "mlp"\nhidden = 64\n[training]\nepochs = 6\neval_every = 5\n'
        '[[strategies]]\nname = "replay"\nmem_size = 60\n[[strategies.plugins]]\nname = "ewc"\nlam = 5.0\n'
        f'[tracking]\nuri = "{uri}"\nlog_model = false\nlog_plots = false\n')
    env = {**os.environ, "LIFELONG_HOME": str(tmp_path / "home")}
    lifelong = [sys.executable, "-m", "lifelong.cli.main"]
    proc = subprocess.Popen([*lifelong, "run", str(cfg_path)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True)
    checkpoints = tmp_path / "home" / "checkpoints"
    deadline = time.monotonic() + 240
    try:  # kill it while it trains experience 2 (the checkpoint after experience 1 exists)
        while time.monotonic() < deadline:
            done = [torch.load(p, weights_only=False)["next_experience"] for p in checkpoints.rglob("*.pt")]
            if done and max(done) >= 2:
                time.sleep(0.3)
                break
            assert proc.poll() is None, proc.stdout.read().decode()
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the process group: Prefect's API server goes too
        proc.wait()
    parent = latest_parent(uri)
    assert client_for(uri).get_run(parent).info.status == "RUNNING"  # it never got to say otherwise
    out = subprocess.run([*lifelong, "run", "--resume", parent, "--tracking-uri", uri], env=env,
                         capture_output=True, text=True, timeout=300, check=False)
    assert out.returncode == 0, out.stdout + out.stderr
    uninterrupted = subprocess.run([*lifelong, "run", str(cfg_path)], env=env, capture_output=True,
                                   text=True, timeout=300, check=False)
    assert uninterrupted.returncode == 0
    client = client_for(uri)
    runs = client.search_runs([client.get_experiment_by_name("lifelong").experiment_id],
                              "tags.`lifelong.flow` = 'continual'")
    finals = [{k: v for k, v in r.data.metrics.items() if k.startswith("final/")}
              for r in runs if r.data.tags.get("mlflow.parentRunId") is not None]
    assert len(finals) == 2 and finals[0] and finals[0] == pytest.approx(finals[1], abs=1e-12)
    assert Path(checkpoints / parent).exists()


def test_prefect_retries_go_back_to_the_last_checkpoint(tmp_path, monkeypatch):
    cfg = load_config(None, overrides(tmp_path))
    full = fc.run_continual(cfg)
    failures = {"left": 1}

    class EpochProgressPlugin(fc.EpochProgressPlugin):  # same name: a stateless plugin to checkpoints
        def before_training_epoch(self, strategy, **kwargs):
            if strategy.experience.current_experience == 2 and strategy.clock.train_exp_epochs == 1 \
                    and failures["left"]:
                failures["left"] -= 1
                raise ConnectionError("the GPU node was preempted")
            super().before_training_epoch(strategy, **kwargs)

    monkeypatch.setattr(fc, "EpochProgressPlugin", EpochProgressPlugin)
    retried = fc.run_continual(load_config(None, overrides(tmp_path, "training.retries=1")))
    assert failures["left"] == 0  # it did fail once, mid-experience
    for a, b in zip(full.results, retried.results, strict=True):
        assert np.array_equal(a.matrix, b.matrix) and a.summary == pytest.approx(b.summary)


def test_retries_need_a_checkpointable_learner(tmp_path):
    cfg = load_config(None, overrides(tmp_path, "training.retries=1", 'strategies=[{name="joint"}]'))
    with pytest.raises(ValueError, match="training.retries: joint cannot go back to a checkpoint"):
        fc.run_continual(cfg)


# OnePrompt (+VOR) and GCond arbitration keep state of their own across experiences (seen classes;
# EMA norms, previous gradients, win history): a resumed run must train exactly as an unbroken one.
SELF_CHECKPOINTING = [
    ("oneprompt+vor", ['model.name="vit"', "model.vit_dim=16", "model.vit_depth=1", "model.vit_heads=2",
                       "model.vit_patch=4","training.epochs=1",
                       'strategies=[{name="oneprompt", vor_epochs=1, outliers_per_class=5}]']),
    ("replay+ewc+gcond(replay)", ['strategies=[{name="replay", mem_size=40, plugins=[{name="ewc", lam=5.0}], '
                                  'arbitrate="gcond"}]',]),
    ("replay+ewc+gcond(penalty)", ['strategies=[{name="replay", mem_size=40, plugins=[{name="ewc", lam=5.0}], '
                                   'arbitrate="gcond", arbitrate_between="penalty"}]',]),
]


@pytest.mark.parametrize("label, extra", SELF_CHECKPOINTING, ids=[s[0] for s in SELF_CHECKPOINTING])
def test_self_checkpointing_learners_resume_to_the_unbroken_run(tmp_path, monkeypatch, label, extra):
    cfg = load_config(None, overrides(tmp_path, *extra))
    full = fc.run_continual(cfg)
    assert full.results[0].label == label
    parent = interrupted_run(cfg, monkeypatch, label=label, at=2)
    saved = torch.load(fc.checkpoint_path(parent, 0), weights_only=False)
    assert saved["next_experience"] == 2 and saved["plugins"]  # its own state is in the checkpoint
    resumed = fc.run_continual(cfg, resume=parent)
    a, b = full.results[0], resumed.results[0]
    assert np.array_equal(a.matrix, b.matrix) and a.summary == pytest.approx(b.summary)
    # The metrics may not show a lost EMA or win history; the plugins' own state at the end does.
    ends = [torch.load(fc.checkpoint_path(run, 0), weights_only=False)["plugins"] for run in (full.parent_run_id, parent)]
    assert same(*ends), ends


def same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


def test_a_killed_ray_run_resumes_to_the_same_final_metrics(tmp_path):
    """SIGKILL `lifelong clients launch --backend ray` mid-experience 1, then `--resume`: the Ray
    actors (and the clients' Context.state in them) are gone; the clients load the state they saved.

    The unbroken run is in-process: both backends give the same bits (test_federated_flow's
    test_inprocess_backend_matches_flowers_ray_engine) when the actors get as many threads as we use.
    """
    from lifelong.clients.state_store import client_slot, saved_rounds
    from lifelong.flows.federated import run_federated

    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    cfg_path = tmp_path / "fed.toml"
    cfg_path.write_text(
        'seed = 3\nflow = "federated"\n[model]\nname = "mlp"\nhidden = 32\n'
        '[training]\nepochs = 2\noptimizer = "adam"\nlr = 0.01\n[stream]\nn_experiences = 2\n'
        f'[federated]\nclients = 2\nrounds = 2\nray_cpus_per_client = {torch.get_num_threads()}\n'
        '[[strategies]]\nname = "replay"\nmem_size = 30\n'
        f'[tracking]\nuri = "{uri}"\nexperiment = "fed"\nlog_model = false\nlog_plots = false\n')
    home = tmp_path / "home"
    env = {**os.environ, "LIFELONG_HOME": str(home)}
    lifelong = [sys.executable, "-m", "lifelong.cli.main", "clients", "launch"]
    proc = subprocess.Popen([*lifelong, str(cfg_path), "--backend", "ray"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 400
    try:  # kill it once round 3 (the first of experience 1, where the clients consolidate) is checkpointed
        while time.monotonic() < deadline:
            saved = [torch.load(p, weights_only=False)["round"] for p in home.glob("checkpoints/*/federated.pt")]
            if saved and max(saved) >= 3:
                break
            assert proc.poll() is None, proc.stdout.read().decode()
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # Prefect's API server and Ray's processes go too
        proc.wait()
    client = client_for(uri)
    run = client.search_runs([client.get_experiment_by_name("fed").experiment_id])[0]
    assert run.info.status == "RUNNING" and run.data.tags["lifelong.backend"] == "ray"
    done = torch.load(home / "checkpoints" / run.info.run_id / "federated.pt", weights_only=False)["round"]
    # Killed within round 4 (the last): the checkpoint is round 3's, or round 4's when the kill came
    # just after it was written; either way the run never said it ended.
    assert 3 <= done <= 4
    assert all(any(r <= done for r in saved_rounds(client_slot(home / "client-state", run.info.run_id, p)))
               for p in (0, 1))
    out = subprocess.run([*lifelong, "--resume", run.info.run_id, "--tracking-uri", uri], env=env,
                         capture_output=True, text=True, timeout=400, check=False)
    assert out.returncode == 0, out.stdout + out.stderr
    back = client.get_run(run.info.run_id)
    assert back.info.status == "FINISHED"
    unbroken = run_federated(load_config(cfg_path, [f'tracking.uri="sqlite:///{tmp_path / "unbroken.db"}"']))
    finals = {k: v for k, v in back.data.metrics.items() if k.startswith("final/")}
    unbroken_finals = {k: v for k, v in client_for(unbroken.tracking_uri).get_run(unbroken.run_id).data.metrics.items()
                       if k.startswith("final/")}  # the pool's and every client's
    assert finals and finals == pytest.approx(unbroken_finals, abs=1e-12)
    # Nothing recorded is lost or logged twice: the checkpoint held what MLflow did not have yet.
    history = {k: sorted(m.step for m in client.get_metric_history(run.info.run_id, k))
               for k in ("round/avg_acc_seen", "matrix/acc_exp0")}
    assert history == {"round/avg_acc_seen": list(range(5)), "matrix/acc_exp0": [0, 1]}
