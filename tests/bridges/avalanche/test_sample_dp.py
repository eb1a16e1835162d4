"""bridges/avalanche/sample_dp.py: DP-SGD (Opacus) for Avalanche strategies, weight penalties after the noise."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from avalanche.core import SupervisedPlugin
from avalanche.training import Naive
from avalanche.training.determinism.rng_manager import RNGManager
from avalanche.training.plugins import EvaluationPlugin, ReplayPlugin
from opacus import GradSampleModule, PrivacyEngine
from opacus.accountants import RDPAccountant
from opacus.optimizers import DPOptimizer, DPPerLayerOptimizer
from torch import nn

from lifelong.bridges.avalanche.learners import quiet_avalanche_deprecations
from lifelong.bridges.avalanche.plugin import RegularizerPlugin
from lifelong.bridges.avalanche.sample_dp import (
    PostNoiseRegularizerPlugin,
    SampleDPPlugin,
    add_penalty_grads,
    check_compatible,
    epsilon_for,
)
from lifelong.config import ModelConfig, StreamConfig
from lifelong.privacy.sample_level import SampleDPConfig, SampleDPError, per_layer_bounds
from lifelong.strategies.regularizers.base import named_params
from lifelong.strategies.regularizers.center_loss import CenterLoss
from lifelong.strategies.regularizers.ewc import EWC
from lifelong.strategies.regularizers.l2 import L2
from lifelong.tasks.models import build_model
from lifelong.tasks.streams import build_stream

MB = 32
#: Opacus' hooks on a first layer whose input needs no gradient: harmless, by design
pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook:UserWarning")


@pytest.fixture(scope="module")
def stream():
    return build_stream(StreamConfig(n_experiences=5), 0)


def mlp(stream, hidden=16):
    RNGManager.set_random_seeds(0)
    return build_model(ModelConfig(name="mlp", hidden=hidden), stream.input_shape, stream.n_classes,
                       multi_head=False)


def naive(model, plugins, lr=0.1, epochs=1):
    return Naive(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=lr),
                 criterion=nn.CrossEntropyLoss(), train_mb_size=MB, train_epochs=epochs, eval_mb_size=512,
                 device="cpu", evaluator=EvaluationPlugin(loggers=[]), plugins=plugins)


def train(strategy, exp, seed=0):
    torch.manual_seed(seed)  # the Poisson sampler draws from the global generator
    with quiet_avalanche_deprecations():
        strategy.train(exp, num_workers=0)


class StopAfter(SupervisedPlugin):
    """Stops after ``n`` updates, keeping the parameters after each."""

    def __init__(self, n):
        super().__init__()
        self.n, self.seen = n, []

    def after_update(self, strategy, **kwargs):
        self.seen.append({k: p.detach().clone() for k, p in named_params(strategy.model).items()})
        if len(self.seen) >= self.n:
            strategy.stop_training()


def far_anchor(model, offset=1.0):
    """An L2 anchor ``offset`` away from every backbone weight: the penalty pulls from step one."""
    return {k: p.detach().clone() + offset for k, p in named_params(model).items() if not k.startswith("head.")}


def dp_run(stream, eps, steps=1, noise=0.0, **cfg):
    model = mlp(stream)
    reg = L2(eps)
    reg.anchor = far_anchor(model)
    stop = StopAfter(steps)
    dp = SampleDPPlugin(SampleDPConfig(noise_multiplier=noise, max_grad_norm=1.0, seed=0, **cfg))
    strategy = naive(model, [dp, PostNoiseRegularizerPlugin(reg, "l2", consolidate=False), stop])
    init = {k: p.detach().clone() for k, p in named_params(model).items()}
    train(strategy, stream.train_stream[0])
    return init, stop.seen, reg, model, dp


# --------------------------------------------------------------------------- the penalty under DP


def test_penalty_changes_the_dp_update_and_adds_exactly_its_hand_computed_gradient(stream):
    """Noise 0, same Poisson batch: θ_λ − θ_0 after one SGD step = −lr · 2 eps (θ − θ*) on the
    backbone, 0 on the head (L2's penalty eps ||θ − θ*||², i.e. λ/2 ||θ − θ*||² with λ = 2 eps)."""
    init, seen0, _, _, _ = dp_run(stream, eps=0.0)
    _, seen100, reg, _, _ = dp_run(stream, eps=100.0)
    lr = 0.1
    for k, p0 in seen0[0].items():
        diff = seen100[0][k] - p0
        if k.startswith("head."):
            assert torch.equal(diff, torch.zeros_like(diff))
        else:
            expected = -lr * 2 * 100.0 * (init[k] - reg.anchor[k])  # = +lr * 200 (offset 1)
            torch.testing.assert_close(diff, expected, rtol=1e-4, atol=1e-4)
            assert diff.abs().min() > 1.0


def test_penalty_changes_the_update_with_noise_and_per_layer_and_ghost(stream):
    for cfg in ({}, {"clipping": "per_layer"}, {"grad_sample_mode": "ghost"}):
        _, a, _, _, _ = dp_run(stream, eps=0.0, noise=1.0, **cfg)
        _, b, _, _, _ = dp_run(stream, eps=100.0, noise=1.0, **cfg)
        backbone = [k for k in a[0] if not k.startswith("head.")]
        assert backbone and all(not torch.allclose(a[0][k], b[0][k]) for k in backbone), cfg


def test_without_the_fix_opacus_drops_the_penalty_lambda_0_and_100_identical():
    """The bug the plugin fixes: Opacus' plain path with the penalty in the loss."""
    x, y = torch.randn(8, 4, generator=torch.Generator().manual_seed(1)), torch.tensor([0, 1] * 4)
    after = []
    for eps in (0.0, 100.0):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
        reg = L2(eps, scope="all")
        reg.anchor = {k: p.detach() + 1.0 for k, p in named_params(model).items()}
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)
        gsm, dp_opt, _ = PrivacyEngine(accountant="rdp").make_private(
            module=model, optimizer=opt, data_loader=loader, noise_multiplier=1.0, max_grad_norm=1.0,
            poisson_sampling=False, noise_generator=torch.Generator().manual_seed(0))
        dp_opt.zero_grad()
        loss = nn.functional.cross_entropy(gsm(x), y) + reg.penalty(gsm, None, None, x)
        assert loss.item() > 1.0 or eps == 0
        loss.backward()
        dp_opt.step()
        after.append([p.detach().clone() for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*after))


def test_add_penalty_grads_by_hand():
    """Tiny model, anchor at zero: ∇ eps ||θ||² = 2 eps θ, added onto an existing grad."""
    lin = nn.Linear(2, 1)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[1.0, -2.0]]))
        lin.bias.copy_(torch.tensor([0.5]))
    lin.weight.grad = torch.tensor([[10.0, 10.0]])
    reg = L2(0.25, scope="all")
    reg.anchor = {"weight": torch.zeros(1, 2), "bias": torch.zeros(1)}
    add_penalty_grads(list(lin.parameters()), reg.penalty(lin, None, None, lin.weight))
    assert torch.allclose(lin.weight.grad, torch.tensor([[10.5, 9.0]]))
    assert torch.allclose(lin.bias.grad, torch.tensor([0.25]))


def test_parameter_names_line_up_through_gradsamplemodule(stream):
    model = mlp(stream)
    assert set(named_params(GradSampleModule(copy.deepcopy(model)))) == set(named_params(model))
    _, seen, reg, model, _ = dp_run(stream, eps=1.0, wrap_model=True)
    assert type(model).__name__ == "Classifier"  # the plain model is back after the experience
    assert set(seen[0]) == set(named_params(model)) and set(reg.anchor) <= set(seen[0])


# --------------------------------------------------------------------------- clipping


def _grads(model, x, y):
    nn.functional.cross_entropy(model(x), y, reduction="mean").backward()


def test_flat_clipping_bounds_each_sample_and_sums_the_clipped_gradients():
    torch.manual_seed(0)
    model = GradSampleModule(nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)))
    x, y = 5 * torch.randn(16, 4), torch.randint(0, 3, (16,))
    opt = DPOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), noise_multiplier=0.0, max_grad_norm=0.1,
                      expected_batch_size=16)
    _grads(model, x, y)
    gs = [p.grad_sample.clone() for p in model.parameters()]  # per-sample, already × 16 for "mean"
    norms = torch.stack([g.flatten(1).norm(dim=1) for g in gs]).norm(dim=0)
    assert (norms > 0.1).sum() >= 8  # most samples need clipping
    factor = (0.1 / (norms + 1e-6)).clamp(max=1.0)
    clipped = [g * factor.view(-1, *[1] * (g.dim() - 1)) for g in gs]
    assert torch.stack([c.flatten(1).norm(dim=1) for c in clipped]).norm(dim=0).max() <= 0.1 + 1e-6
    opt.pre_step()
    for p, c in zip(model.parameters(), clipped):
        torch.testing.assert_close(p.summed_grad, c.sum(0))
        torch.testing.assert_close(p.grad, c.sum(0) / 16)  # noise 0, scaled by the expected batch


def test_per_layer_clipping_bounds_each_layer_of_each_sample():
    torch.manual_seed(0)
    inner = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    params = list(inner.parameters())
    bounds = per_layer_bounds(params, SampleDPConfig(noise_multiplier=0.0, max_grad_norm=0.2, clipping="per_layer"))
    assert math.isclose(sum(b * b for b in bounds), 0.2 ** 2) and len(bounds) == 4
    model = GradSampleModule(inner)
    opt = DPPerLayerOptimizer(torch.optim.SGD(params, lr=0.1), noise_multiplier=0.0, max_grad_norm=bounds,
                              expected_batch_size=16)
    x, y = 5 * torch.randn(16, 4), torch.randint(0, 3, (16,))
    _grads(model, x, y)
    gs = [p.grad_sample.clone() for p in params]
    opt.pre_step()
    for p, g, b in zip(params, gs, bounds):
        n = g.flatten(1).norm(dim=1)
        c = g * (b / (n + 1e-6)).clamp(max=1.0).view(-1, *[1] * (g.dim() - 1))
        assert c.flatten(1).norm(dim=1).max() <= b + 1e-6
        torch.testing.assert_close(p.summed_grad, c.sum(0))


def test_explicit_per_layer_bounds_must_match_the_tensors():
    with pytest.raises(SampleDPError, match="one bound per trainable tensor"):
        per_layer_bounds([torch.zeros(2)] * 3, SampleDPConfig(1.0, 1.0, "per_layer", layer_bounds=(1.0, 1.0)))
    with pytest.raises(SampleDPError, match="ghost"):
        SampleDPConfig(1.0, 1.0, "per_layer", grad_sample_mode="ghost")


# --------------------------------------------------------------------------- accounting


def test_epsilon_matches_opacus_accountant_and_an_independent_pld(stream):
    model = mlp(stream)
    dp = SampleDPPlugin(SampleDPConfig(noise_multiplier=1.1, max_grad_norm=1.0, delta=1e-5, seed=0))
    strategy = naive(model, [dp])
    train(strategy, stream.train_stream[0])
    train(strategy, stream.train_stream[1])
    r0, r1 = dp.reports
    n0 = len(stream.train_stream[0].dataset)
    assert math.isclose(r0.sample_rate, 1 / math.ceil(n0 / MB))  # Opacus: q = 1 / len(loader)
    assert r0.steps == math.ceil(n0 / MB)  # one epoch: len(loader) Poisson batches
    ref = RDPAccountant()
    ref.history = [(1.1, r0.sample_rate, r0.steps)]
    assert math.isclose(r0.epsilon, ref.get_epsilon(1e-5), rel_tol=1e-9)
    assert math.isclose(r0.epsilon_experience, r0.epsilon, rel_tol=1e-9)
    # composed over both experiences: more than either alone, equal to the accountant's
    ref.history.append((1.1, r1.sample_rate, r1.steps))
    assert math.isclose(r1.epsilon, ref.get_epsilon(1e-5), rel_tol=1e-9) and r1.epsilon > r1.epsilon_experience
    # independent implementation: Google's dp_accounting (PLD), same mechanism
    import dp_accounting
    from dp_accounting.pld import PLDAccountant

    event = dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(r0.sample_rate, dp_accounting.GaussianDpEvent(1.1)), r0.steps)
    pld = PLDAccountant().compose(event).get_epsilon(1e-5)
    prv = epsilon_for(1.1, r0.sample_rate, r0.steps, 1e-5, "prv")
    assert math.isclose(prv, pld, rel_tol=0.05)
    assert pld <= r0.epsilon_experience <= 1.5 * pld  # RDP is the looser bound


# --------------------------------------------------------------------------- refusals


@pytest.mark.parametrize("reg, word", [(CenterLoss(0.1, 0.5, 10), "center"), (EWC(1.0), "Fisher")])
def test_data_dependent_regularisers_are_refused(reg, word):
    with pytest.raises(SampleDPError, match=word):
        PostNoiseRegularizerPlugin(reg, "x")


def test_plain_regularizer_plugin_and_replay_are_refused():
    with pytest.raises(SampleDPError, match="Opacus drops it"):
        check_compatible([RegularizerPlugin(L2(1.0), "l2")])
    with pytest.raises(SampleDPError, match=r"\(center_loss\) cannot be combined with sample-level DP: its centers"):
        check_compatible([_unchecked(CenterLoss(0.1, 0.5, 10))])
    with pytest.raises(SampleDPError, match="Poisson"):
        check_compatible([ReplayPlugin(mem_size=10)])


def test_a_regulariser_outside_the_catalogue_and_a_subclass_are_refused():
    """Only a catalogue entry's own class is known to read the weights only: a subclass may keep
    state of its own; an unnamed regulariser from elsewhere is named by its class."""

    class MyL2(L2):
        pass

    class Elsewhere:
        def penalty(self, *args):
            return torch.zeros(())

    with pytest.raises(SampleDPError, match=r"MyL2' cannot be combined with sample-level DP: \S*MyL2 is not in the catalogue"):
        PostNoiseRegularizerPlugin(MyL2(1.0))
    with pytest.raises(SampleDPError, match=r"Elsewhere' cannot be combined .*Elsewhere is not in the catalogue.*regularisers that can: l2"):
        PostNoiseRegularizerPlugin(Elsewhere())
    PostNoiseRegularizerPlugin(L2(1.0))  # the entry's own class is accepted


def _unchecked(reg):
    """A PostNoiseRegularizerPlugin built around the constructor's check (as a restored one could be)."""
    p = PostNoiseRegularizerPlugin(L2(1.0), "cl")
    p.regularizer = reg
    return p


def test_center_loss_refused_when_training_starts(stream):
    model = mlp(stream)
    dp = SampleDPPlugin(SampleDPConfig(noise_multiplier=1.0, max_grad_norm=1.0))
    strategy = naive(model, [dp, RegularizerPlugin(CenterLoss(0.1, 0.5, 10), "center_loss")])
    with pytest.raises(SampleDPError, match="center_loss"):
        train(strategy, stream.train_stream[0])


# --------------------------------------------------------------------------- it still learns


@torch.no_grad()
def _loss(model, x, y):
    model.eval()
    return nn.functional.cross_entropy(model(x), y).item()


@pytest.mark.parametrize("mode", ["hooks", "ghost"])
def test_training_reduces_the_loss_on_digits_with_moderate_noise(stream, mode):
    model = mlp(stream, hidden=32)
    x, y, _ = stream.test_tensors(0)
    before = _loss(model, x, y)
    dp = SampleDPPlugin(SampleDPConfig(noise_multiplier=1.0, max_grad_norm=1.0, grad_sample_mode=mode, seed=0))
    strategy = naive(model, [dp, PostNoiseRegularizerPlugin(L2(0.01), "l2")], lr=0.5, epochs=3)
    train(strategy, stream.train_stream[0])
    after = _loss(model, x, y)
    assert after < 0.5 * before, (before, after)
    acc = (model(x).argmax(1) == y).float().mean().item()
    assert acc > 0.8
    assert dp.reports[0].epsilon > 0 and not hasattr(next(model.parameters()), "grad_sample")
    assert strategy.optimizer.__class__ is torch.optim.SGD


def test_benchmark_reports_every_mode():
    from bench.privacy import opacus_steps  # the repository root is on the path (python -m pytest)

    res = opacus_steps("mlp", batch_size=8, steps=1, warmup=0)
    assert set(res) == {"non_private", "flat", "per_layer", "ghost"} and all(v > 0 for v in res.values())
