"""Regressions found in review: evaluation steps, pretraining and RNG, failures before training."""

import pytest
import torch

from lifelong.config import load_config

pytestmark = pytest.mark.integration


def cfg_with(tmp_path, *extra):
    return load_config(None, ['model.name="mlp"', "model.hidden=16", "training.epochs=1",
                              "tracking.log_model=false", "tracking.log_plots=false",
                              f'tracking.uri="sqlite:///{tmp_path / "r.db"}"', *extra])


def test_evaluation_after_update_u_is_logged_at_step_u_and_each_switch_keeps_its_first_point(tmp_path):
    from lifelong.flows.continual import run_continual

    cfg = cfg_with(tmp_path, "training.eval_every=1", "stream.n_experiences=2",
                   'strategies=[{name="naive"}]')
    result = run_continual(cfg)
    from lifelong.tracking import client_for

    hist = client_for(cfg.tracking.uri).get_metric_history(result.results[0].run_id, "ceval/acc_exp1")
    steps = sorted(m.step for m in hist)
    first = steps[0]  # the pre-update point of experience 1 (after experience 0's last update)
    assert steps[:3] == [first, first + 1, first + 2]  # then one point after every update
    assert result.results[0].train_iterations == steps[-1]


def test_pretraining_does_not_change_the_first_learners_shuffle(tmp_path):
    from lifelong.flows.continual import run_continual

    cfg = cfg_with(tmp_path, "stream.holdout_fraction=0.3", "pretrain.epochs=1",
                   'strategies=[{name="naive", label="a"}, {name="naive", label="b"}]')
    r = run_continual(cfg)
    assert torch.equal(torch.tensor(r.results[0].matrix), torch.tensor(r.results[1].matrix))


def test_unavailable_device_is_refused_before_any_run(tmp_path):
    from typer.testing import CliRunner

    from lifelong.cli.main import app

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    out = CliRunner().invoke(app, ["run", "--set", 'training.device="cuda"',
                                   "--set", f'tracking.uri="sqlite:///{tmp_path / "d.db"}"'])
    assert out.exit_code == 2 and "no CUDA device" in out.output
    assert not (tmp_path / "d.db").exists()


def test_online_ewc_on_a_task_incremental_stream(tmp_path):
    from lifelong.flows.continual import run_continual

    cfg = cfg_with(tmp_path, 'stream.scenario="task"', "stream.n_experiences=2",
                   'strategies=[{name="naive", plugins=[{name="ewc", mode="online"}]}]')
    assert run_continual(cfg).results[0].matrix.shape == (2, 2)
