"""Server optimizers (fedavg, fedadam, lamb, lars) against hand-computed steps, and in a federated run."""

import math

import pytest
import torch

from lifelong.strategies.federated.server_optimizers import (
    ServerOptimizer,
    resolve_hyperparameters,
    trust_ratio,
)

T = torch.tensor


def close(a: torch.Tensor, expected: list[float]) -> bool:
    return torch.allclose(a, T(expected), rtol=1e-5, atol=1e-7)


def test_fedavg_with_lr_1_is_the_aggregate_exactly():
    current = {"w": T([1.0, 2.0]), "b": T([0.3]), "n": T(4)}
    agg = {"w": T([0.1 + 0.2, 7.0]), "b": T([-0.7]), "n": T(5)}
    out = ServerOptimizer("fedavg").step(current, agg)
    assert all(out[k] is agg[k] for k in agg)  # no x + (agg - x): that would not give the same bits


def test_fedavg_with_a_server_lr():
    out = ServerOptimizer("fedavg", lr=0.5).step({"w": T([1.0, 2.0]), "b": T([0.0])},
                                                  {"w": T([2.0, 0.0]), "b": T([1.0])})
    assert close(out["w"], [1.5, 1.0]) and close(out["b"], [0.5])  # x + 0.5 (agg - x)


def test_fedadam_follows_reddi_et_al_algorithm_2():
    opt = ServerOptimizer("fedadam", lr=0.1, momentum=0.9, beta2=0.99, eps=1e-3)
    x0 = {"w": T([1.0, 2.0]), "b": T([0.5])}
    x1 = opt.step(x0, {"w": T([1.5, 1.0]), "b": T([0.5])})  # Delta: w [0.5, -1], b [0]
    # m = 0.1 Delta = [0.05, -0.1]; v = 0.01 Delta^2 = [0.0025, 0.01]; sqrt(v) = [0.05, 0.1]
    assert close(x1["w"], [1.0 + 0.1 * 0.05 / 0.051, 2.0 - 0.1 * 0.1 / 0.101])
    assert close(x1["b"], [0.5])  # m = v = 0: no step
    # A round with Delta = 0 still moves by the momentum: m = 0.9 m, v = 0.99 v.
    x2 = opt.step(x1, dict(x1))
    m, v = [0.045, -0.09], [0.99 * 0.0025, 0.99 * 0.01]
    step = [0.1 * mi / (math.sqrt(vi) + 1e-3) for mi, vi in zip(m, v)]
    assert close(x2["w"], [float(x1["w"][0]) + step[0], float(x1["w"][1]) + step[1]])
    assert opt.steps == 2


def test_lamb_scales_each_layer_by_its_trust_ratio():
    opt = ServerOptimizer("lamb", lr=0.01, momentum=0.9, beta2=0.999, eps=1e-6)
    x = {"w": T([3.0, 4.0]), "b": T([0.0, 0.0]), "still": T([1.0, -1.0])}
    agg = {"w": T([3.1, 3.8]), "b": T([0.2, 0.0]), "still": T([1.0, -1.0])}
    out = opt.step(x, agg)
    # t = 1: bias correction makes m^ = g = -Delta and v^ = g^2, so r = g / (|g| + eps).
    r_w = [-0.1 / (0.1 + 1e-6), 0.2 / (0.2 + 1e-6)]
    ratio = 5.0 / math.hypot(*r_w)  # ||x_w|| / ||r_w||
    assert close(out["w"], [3.0 - 0.01 * ratio * r_w[0], 4.0 - 0.01 * ratio * r_w[1]])
    assert torch.linalg.vector_norm(out["w"] - x["w"]) == pytest.approx(0.01 * 5.0, rel=1e-5)  # lr ||x_l||
    # ||x_b|| = 0: ratio 1, the plain Adam direction; r_b = [-0.2 / (0.2 + eps), 0].
    assert close(out["b"], [0.01 * 0.2 / (0.2 + 1e-6), 0.0])
    assert torch.equal(out["still"], x["still"])  # a zero step stays zero (ratio 1)


def test_lamb_weight_decay_enters_the_step_and_the_ratio():
    opt = ServerOptimizer("lamb", lr=0.1, weight_decay=0.5, eps=1e-6)
    out = opt.step({"w": T([2.0, 0.0])}, {"w": T([2.0, 0.0])})  # Delta = 0: r = 0, u = 0.5 x = [1, 0]
    assert close(out["w"], [2.0 - 0.1 * (2.0 / 1.0) * 1.0, 0.0])


def test_trust_ratio_zero_norm_conventions():
    assert trust_ratio(T([3.0, 4.0]), T([0.0, 2.0])) == pytest.approx(2.5)
    assert trust_ratio(T([0.0, 0.0]), T([1.0, 1.0])) == 1.0
    assert trust_ratio(T([1.0, 0.0]), T([0.0, 0.0])) == 1.0


def test_lars_follows_you_gitman_ginsburg_algorithm_1():
    opt = ServerOptimizer("lars", lr=0.01, momentum=0.9)
    x = {"w": T([3.0, 4.0]), "b": T([0.0, 0.0])}
    x1 = opt.step(x, {"w": T([3.3, 3.6]), "b": T([0.2, 0.0])})
    # w: g = [-0.3, 0.4], local lr ||x|| / ||g|| = 5 / 0.5 = 10, v = 0.01 * 10 * g = [-0.03, 0.04]
    assert close(x1["w"], [3.03, 3.96])
    # b: ||x_b|| = 0, local lr 1: v = 0.01 * [-0.2, 0]
    assert close(x1["b"], [0.002, 0.0])
    # Delta = 0: ||g|| = 0, local lr 1, the momentum carries on: v = 0.9 [-0.03, 0.04]
    x2 = opt.step(x1, dict(x1))
    assert close(x2["w"], [3.03 + 0.027, 3.96 - 0.036])


def test_lars_weight_decay():
    opt = ServerOptimizer("lars", lr=0.01, momentum=0.0, weight_decay=0.1)
    out = opt.step({"w": T([3.0, 4.0])}, {"w": T([3.3, 3.6])})
    # local = 5 / (0.5 + 0.1 * 5) = 5; v = 0.01 * 5 * (g + 0.1 x) = 0.05 * [0, 0.8]
    assert close(out["w"], [3.0, 3.96])


@pytest.mark.parametrize("name", ["fedavg", "fedadam", "lamb", "lars"])
def test_non_float_buffers_take_the_aggregates_value(name):
    out = ServerOptimizer(name, lr=0.5).step({"w": T([1.0]), "n": T(3)}, {"w": T([2.0]), "n": T(5)})
    assert out["n"].dtype == torch.int64 and int(out["n"]) == 5


@pytest.mark.parametrize("name", ["fedadam", "lamb", "lars"])
def test_state_round_trips(name):
    gen = torch.Generator().manual_seed(0)
    rounds = [{"w": torch.randn(3, 2, generator=gen), "b": torch.randn(2, generator=gen)} for _ in range(3)]
    a, b = ServerOptimizer(name), ServerOptimizer(name)
    x = a.step(rounds[0], rounds[1])
    b.load_state_dict(a.state_dict())
    ya, yb = a.step(x, rounds[2]), b.step(x, rounds[2])
    assert all(torch.equal(ya[k], yb[k]) for k in ya)
    with pytest.raises(ValueError, match="cannot be loaded"):
        ServerOptimizer(name, lr=0.5).load_state_dict(a.state_dict())


@pytest.mark.parametrize("name, given, message", [
    ("sgd", {}, "is not one of"),
    ("fedavg", {"momentum": 0.9}, "federated.server_momentum: the 'fedavg' server optimizer does not use it"),
    ("lars", {"eps": 1e-3}, "federated.server_eps"),
    ("fedadam", {"weight_decay": 0.1}, "federated.server_weight_decay"),
    ("lamb", {"lr": 0.0}, "federated.server_lr: must be finite and > 0"),
    ("fedadam", {"beta2": 1.0}, "federated.server_beta2: must be in [0, 1)"),
])
def test_bad_hyperparameters_are_refused(name, given, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        resolve_hyperparameters(name, **given)


def test_keys_the_optimizer_does_not_use_are_refused_in_the_config():
    from lifelong.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="federated.server_beta2: the 'lars' server optimizer does not use it"):
        load_config(None, ['federated.server_optimizer="lars"', "federated.server_beta2=0.9"])
    cfg = load_config(None, ['federated.server_optimizer="lamb"', "federated.server_lr=0.05"])
    assert ServerOptimizer(cfg.federated.server_optimizer, **cfg.federated.server_hyperparameters).hp["lr"] == 0.05


# --------------------------------------------------------------------------- in a federated run


@pytest.mark.integration
@pytest.mark.parametrize("name", ["fedadam", "lamb"])
def test_a_short_federated_run_checkpoints_the_optimizer_state(tmp_path, monkeypatch, name):
    from lifelong.config import load_config
    from lifelong.flows.checkpoints import checkpoint_file
    from lifelong.flows.federated import run_federated

    monkeypatch.setenv("LIFELONG_HOME", str(tmp_path / "home"))
    cfg = load_config(None, [
        'flow="federated"', 'model.name="mlp"', "model.hidden=16", "training.epochs=1", "stream.n_experiences=2",
        "federated.clients=2", "federated.rounds=1", f'federated.server_optimizer="{name}"',
        f'tracking.uri="sqlite:///{tmp_path / "m.db"}"', "tracking.log_model=false", "tracking.log_plots=false",
        "tracking.register_model=false"])
    result = run_federated(cfg)
    assert result.rounds == 2 and not result.skipped_rounds
    saved = torch.load(checkpoint_file(result.run_id), weights_only=False)["server"]["optimizer"]
    assert saved["name"] == name and saved["steps"] == 2
    assert set(saved["m"]) == set(result.weights) and set(saved["v"]) == set(result.weights)
    again = ServerOptimizer(name)
    again.load_state_dict(saved)
    assert all(torch.equal(again.m[k], saved["m"][k]) for k in saved["m"])
    from lifelong.tracking import client_for

    tag = client_for(cfg.tracking.uri).get_run(result.run_id).data.tags["server_optimizer"]
    assert tag == again.describe() and tag.startswith(f"{name} lr=")
