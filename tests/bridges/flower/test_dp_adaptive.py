"""Adaptive clipping in the DP wrapper (Andrew et al. 2021): the bound tracks the target quantile of
the update norms; the update's noise multiplier leaves room for the count's noise."""

import math

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from lifelong.bridges.flower.dp_fedavg import AdaptiveClipping, UserLevelDP
from lifelong.bridges.flower.fedavg import ContinualFedAvg
from lifelong.clients.inprocess import InProcessGrid
from lifelong.privacy.accounting import PrivacyBudgetError, UserLevelPrivacy
from lifelong.strategies.federated.server_optimizers import ServerOptimizer


class FixedUpdateApp:
    """Every client replies with the model it got plus [1.2, 1.6] (norm 2) on every tensor, frozen
    ones too: the server must not take a frozen parameter from a client whatever it sends."""

    def __call__(self, msg, context):
        got = msg.content["arrays"].to_torch_state_dict()
        pid = int(context.node_config["partition-id"])
        metrics = MetricRecord({"num-examples": 1, "train-loss": 0.0, "partition-id": pid, "experience": 0})
        arrays = ArrayRecord({k: v + torch.tensor([1.2, 1.6]) for k, v in got.items()})
        return Message(RecordDict({"arrays": arrays, "metrics": metrics}), reply_to=msg)


def run_rounds(strategy, grid, n, layers=("w",)):
    arrays, bounds = ArrayRecord({k: torch.zeros(2) for k in layers}), []
    for r in range(1, n + 1):
        bounds.append(strategy.clip)
        msgs = list(strategy.configure_train(r, arrays, ConfigRecord(), grid))
        arrays, _ = strategy.aggregate_train(r, list(grid.send_and_receive(msgs)))
    return arrays, bounds


def adaptive_dp(clip=0.5, count_noise_std=1e-9, optimizer=None):
    inner = ContinualFedAvg(1.0, 1, 4, seed=0, server_optimizer=optimizer)
    return UserLevelDP(inner, "flat", clip, 0.0, expected_cohort=4,
                       adaptive=AdaptiveClipping(0.5, 0.2, count_noise_std), seed=0)


def test_the_bound_moves_geometrically_to_the_median_norm():
    strategy = adaptive_dp()
    _, bounds = run_rounds(strategy, InProcessGrid(FixedUpdateApp(), 4), 25)
    # All four norms are 2: below it every update is clipped (b~ = 0), so C grows by exp(0.2 * 0.5)
    # a round, 0.5 e^{0.1 r}, until it passes 2; then it stays within a factor e^{0.1} of 2.
    climb = math.ceil(math.log(2 / 0.5) / 0.1)  # 14 rounds from 0.5 to >= 2
    assert bounds[:climb + 1] == pytest.approx([0.5 * math.exp(0.1 * r) for r in range(climb + 1)], rel=1e-6)
    assert all(abs(math.log(c / 2.0)) <= 0.1 + 1e-6 for c in bounds[climb:])
    assert strategy.clip_stats[1]["clip_bound"] == 0.5 and strategy.clip_stats[1]["clipped_fraction"] == 1.0


def test_per_layer_bounds_scale_with_the_adapted_bound():
    inner = ContinualFedAvg(1.0, 1, 4, seed=0)
    strategy = UserLevelDP(inner, "per_layer", 0.5, 0.0, 4, adaptive=AdaptiveClipping(0.5, 0.2, 1e-9))
    arrays, bounds = run_rounds(strategy, InProcessGrid(FixedUpdateApp(), 4), 3, layers=("w", "b"))
    # Total norm 2 sqrt(2) > C every round, so C grows by e^{0.1}; each layer is clipped to
    # C / sqrt(2) of that round, and the round adds the mean of four such updates.
    assert bounds == pytest.approx([0.5, 0.5 * math.exp(0.1), 0.5 * math.exp(0.2)])
    step = torch.tensor([0.6, 0.8])  # the update's direction
    for k in ("w", "b"):
        assert torch.allclose(arrays.to_torch_state_dict()[k], sum(bounds) / math.sqrt(2) * step, atol=1e-6)


def test_the_state_round_trips_with_the_server_optimizer():
    grid = InProcessGrid(FixedUpdateApp(), 4)
    a = adaptive_dp(count_noise_std=0.5, optimizer=ServerOptimizer("fedadam"))
    run_rounds(a, grid, 3)
    b = adaptive_dp(count_noise_std=0.5, optimizer=ServerOptimizer("fedadam"))
    b.load_server_state(a.server_state())
    assert b.clip == a.clip and b.inner.server_optimizer.steps == 3
    arrays = ArrayRecord({"w": torch.tensor([0.3, -0.1])})
    out = []
    for s in (a, b):
        msgs = list(s.configure_train(4, arrays, ConfigRecord(), grid))
        out.append(s.aggregate_train(4, list(grid.send_and_receive(msgs)))[0].to_torch_state_dict()["w"])
    assert torch.equal(out[0], out[1]) and a.clip == b.clip


def test_update_noise_multiplier_follows_theorem_1():
    p = UserLevelPrivacy(1.0, cohort_size=10, population=100, rounds=5, delta=1e-3, count_noise_std=2.0)
    assert p.update_noise_multiplier == pytest.approx((1.0 - 1 / 16) ** -0.5)  # (z^-2 - (2 sigma_b)^-2)^-1/2
    plain = UserLevelPrivacy(1.0, cohort_size=10, population=100, rounds=5, delta=1e-3)
    assert plain.update_noise_multiplier == 1.0
    assert p.epsilon() == plain.epsilon()  # the accountant still accounts z: both releases together
    assert "adaptive clipping" in p.describe() and "adaptive" not in plain.describe()
    with pytest.raises(PrivacyBudgetError, match=r"need 2\*sigma_b > z"):
        UserLevelPrivacy(1.0, cohort_size=10, population=100, rounds=5, delta=1e-3, count_noise_std=0.5)


# --------------------------------------------------------------------------- config


FED = ['flow="federated"', 'model.name="mlp"', "stream.n_experiences=2", "federated.clients=4", "federated.rounds=2",
       "privacy.delta=1e-3"]


@pytest.mark.parametrize("extra, message", [
    (["privacy.adaptive_clipping=true"], "privacy.adaptive_clipping: adapts the clipping bound; set privacy.clipping"),
    (['privacy.clipping="flat"', "privacy.noise_multiplier=0.1", "privacy.clipped_count_stddev=1.0"],
     "privacy.clipped_count_stddev: only adaptive clipping noises a count"),
    (['privacy.clipping="flat"', "privacy.noise_multiplier=0.1", "privacy.adaptive_clipping=true",
      "privacy.target_quantile=1.5"], "privacy.target_quantile"),
    (['privacy.clipping="flat"', "privacy.noise_multiplier=0.1", "privacy.adaptive_clipping=true",
      "privacy.clip_lr=0"], "privacy.clip_lr"),
])
def test_bad_adaptive_clipping_keys_are_refused(extra, message):
    from lifelong.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=message):
        load_config(None, FED + extra)


def test_a_count_noise_too_small_for_z_is_refused_before_the_run():
    from lifelong.config import load_config
    from lifelong.flows.federated import privacy_plan

    adaptive = ['privacy.clipping="flat"', "privacy.adaptive_clipping=true"]
    # Default sigma_b = 4 sampled / 20 = 0.2: 2 sigma_b = 0.4 must exceed z.
    with pytest.raises(PrivacyBudgetError, match=r"privacy.clipped_count_stddev \(default: 4 sampled clients / 20\)"):
        privacy_plan(load_config(None, FED + adaptive + ["privacy.noise_multiplier=0.5"]))
    plan = privacy_plan(load_config(None, FED + adaptive + ["privacy.noise_multiplier=0.3"]))
    assert plan.count_noise_std == pytest.approx(0.2)
    assert plan.update_noise_multiplier == pytest.approx((0.3**-2 - 0.4**-2) ** -0.5)


class BufferApp:
    """Replies with the float weights plus [1.2, 1.6] and client-made non-float buffers (a batch
    counter that reveals the share's size, a mask)."""

    def __call__(self, msg, context):
        got = msg.content["arrays"].to_torch_state_dict()
        pid = int(context.node_config["partition-id"])
        metrics = MetricRecord({"num-examples": 1, "train-loss": 0.0, "partition-id": pid, "experience": 0})
        arrays = ArrayRecord({"w": got["w"] + torch.tensor([1.2, 1.6]), "count": got["count"] + 100 * (pid + 1),
                              "mask": torch.zeros(2, dtype=torch.bool)})
        return Message(RecordDict({"arrays": arrays, "metrics": metrics}), reply_to=msg)


def test_non_float_buffers_keep_the_global_value_and_only_floats_are_clipped():
    strategy = UserLevelDP(ContinualFedAvg(1.0, 1, 4, seed=0), "flat", 1.0, 0.0, expected_cohort=4)
    grid = InProcessGrid(BufferApp(), 4)
    arrays = ArrayRecord({"w": torch.zeros(2), "count": torch.tensor(7), "mask": torch.ones(2, dtype=torch.bool)})
    new, _ = strategy.aggregate_train(1, list(grid.send_and_receive(
        list(strategy.configure_train(1, arrays, ConfigRecord(), grid)))))
    out = new.to_torch_state_dict()
    # Each update [1.2, 1.6] (norm 2) is clipped to norm 1: [0.6, 0.8]; the mean of four is that.
    assert torch.allclose(out["w"], torch.tensor([0.6, 0.8]))
    assert int(out["count"]) == 7 and out["mask"].dtype == torch.bool and bool(out["mask"].all())
    assert strategy.clip_stats[1]["mean_update_norm"] == pytest.approx(2.0)


def private_round(noise_multiplier, frozen=("backbone.w", "backbone.b")):
    strategy = UserLevelDP(ContinualFedAvg(1.0, 1, 4, seed=0), "per_layer", 1.0, noise_multiplier,
                           expected_cohort=4, seed=0, frozen=frozen)
    grid = InProcessGrid(FixedUpdateApp(), 4)
    start = {"backbone.w": torch.tensor([0.1, 0.3]), "backbone.b": torch.tensor([-0.7, 1 / 3]),
             "head.w": torch.zeros(2), "head.b": torch.zeros(2), "bn.running_mean": torch.zeros(2)}
    new, _ = strategy.aggregate_train(1, list(grid.send_and_receive(
        list(strategy.configure_train(1, ArrayRecord(start), ConfigRecord(), grid)))))
    return start, new.to_torch_state_dict()


def test_frozen_parameters_keep_the_global_value_and_the_rest_is_clipped_and_noised():
    start, out = private_round(0.0)
    assert all(torch.equal(out[k], start[k]) for k in ("backbone.w", "backbone.b"))  # bit for bit
    # Per-layer bounds over the 3 private tensors only (a float buffer is one): C / sqrt(3) each, so
    # every [1.2, 1.6] becomes [0.6, 0.8] / sqrt(3); the mean of four equal updates is that.
    for k in ("head.w", "head.b", "bn.running_mean"):
        assert torch.allclose(out[k], torch.tensor([0.6, 0.8]) / math.sqrt(3), atol=1e-6)
    _, noised = private_round(1.0)
    assert all(torch.equal(noised[k], start[k]) for k in ("backbone.w", "backbone.b"))
    assert all(not torch.equal(noised[k], out[k]) for k in ("head.w", "head.b", "bn.running_mean"))


def test_frozen_keys_the_model_lacks_are_refused_before_clients_train():
    strategy = UserLevelDP(ContinualFedAvg(1.0, 1, 4, seed=0), "flat", 1.0, 0.0, 4, frozen=("backbone.x",))
    grid = InProcessGrid(FixedUpdateApp(), 4)
    with pytest.raises(ValueError, match=r"frozen keys \['backbone.x'\] are not in the global model"):
        strategy.configure_train(1, ArrayRecord({"w": torch.zeros(2)}), ConfigRecord(), grid)
