"""strategies/regularizers/ewc.py: empirical Fisher, penalty, separate/online modes, state; against Avalanche's EWCPlugin."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
from avalanche.training import Naive
from avalanche.training.determinism.rng_manager import RNGManager
from avalanche.training.plugins import EvaluationPlugin, EWCPlugin
from torch import nn

from lifelong.bridges.avalanche.learners import quiet_avalanche_deprecations
from lifelong.bridges.avalanche.plugin import RegularizerPlugin, avalanche_forward_fn
from lifelong.config import ModelConfig, StreamConfig
from lifelong.strategies.regularizers.ewc import EWC, empirical_fisher
from lifelong.tasks.evaluation import evaluate
from lifelong.tasks.models import build_model
from lifelong.tasks.streams import build_stream

pytestmark = pytest.mark.filterwarnings("ignore:No loggers specified")

# --------------------------------------------------------------------------- a tiny linear model

W0 = [[0.5, -1.0], [0.25, 0.75]]
B0 = [0.1, -0.2]

BATCHES = [
    (torch.tensor([[1.0, 2.0], [0.0, -1.0]]), torch.tensor([0, 1]), torch.zeros(2, dtype=torch.long)),
    (torch.tensor([[0.5, 0.5], [-2.0, 1.0], [3.0, 0.0]]), torch.tensor([1, 1, 0]), torch.zeros(3, dtype=torch.long)),
]


def linear(w=W0, b=B0) -> nn.Linear:
    m = nn.Linear(2, 2)
    with torch.no_grad():
        m.weight.copy_(torch.tensor(w))
        m.bias.copy_(torch.tensor(b))
    return m


def ce_grads(w: torch.Tensor, b: torch.Tensor, x: torch.Tensor, y: torch.Tensor):
    """Gradients of the mean softmax cross-entropy of ``x @ w.T + b`` — closed form, no autograd:
    with G = (softmax(z) - onehot(y)) / B, dL/dW = G^T x and dL/db = sum_i G_i."""
    z = x.double() @ w.double().T + b.double()
    p = torch.exp(z - z.max(1, keepdim=True).values)
    p = p / p.sum(1, keepdim=True)
    g = (p - torch.eye(w.shape[0], dtype=torch.float64)[y]) / len(y)
    return g.T @ x.double(), g.sum(0)


def hand_fisher(w, b, batches) -> dict[str, torch.Tensor]:
    w, b = torch.as_tensor(w), torch.as_tensor(b)
    sq = [ce_grads(w, b, x, y) for x, y, _ in batches]
    return {
        "weight": (sum(gw ** 2 for gw, _ in sq) / len(sq)).float(),
        "bias": (sum(gb ** 2 for _, gb in sq) / len(sq)).float(),
    }


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.allclose(a, b, rtol=1e-5, atol=1e-7)


def test_closed_form_gradient_agrees_with_a_worked_example():
    """The independent formula itself, checked on one sample computed on paper.

    w = 0, b = 0: z = (0, 0), p = (1/2, 1/2); y = 0: p - onehot = (-1/2, 1/2);
    dL/dW = [[-1/2 * x], [1/2 * x]], dL/db = (-1/2, 1/2).
    """
    gw, gb = ce_grads(torch.zeros(2, 2), torch.zeros(2), torch.tensor([[2.0, -4.0]]), torch.tensor([0]))
    assert gw.tolist() == [[-1.0, 2.0], [1.0, -2.0]]
    assert gb.tolist() == [-0.5, 0.5]


def test_empirical_fisher_is_mean_of_squared_batch_gradients():
    model = linear()
    fisher = empirical_fisher(model, BATCHES)
    expected = hand_fisher(W0, B0, BATCHES)
    assert set(fisher) == {"weight", "bias"}
    for k in expected:
        assert close(fisher[k], expected[k]), k
    # mean over batches, not sum, and not the square of the mean gradient
    one = hand_fisher(W0, B0, BATCHES[:1])
    assert not close(fisher["weight"], one["weight"])


def test_empirical_fisher_leaves_model_mode_params_and_grads_alone():
    model = linear()
    model.train()
    before = copy.deepcopy(model.state_dict())
    empirical_fisher(model, BATCHES)
    assert model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None or not p.grad.any() for p in model.parameters())
    model.eval()
    empirical_fisher(model, BATCHES)
    assert not model.training


def test_empirical_fisher_of_no_batches_is_zero():
    fisher = empirical_fisher(linear(), [])
    assert all(not f.any() for f in fisher.values())


def test_penalty_value_and_gradient_by_hand():
    lam = 3.0
    ewc = EWC(lam)
    F = {"weight": torch.tensor([[1.0, 2.0], [0.5, 0.0]]), "bias": torch.tensor([4.0, 0.25])}
    anchor = {"weight": torch.tensor([[0.0, -1.0], [1.0, 1.0]]), "bias": torch.tensor([0.0, 0.0])}
    ewc.fishers, ewc.anchors = [F], [anchor]
    model = linear()  # W0 = [[.5, -1], [.25, .75]], B0 = [.1, -.2]
    # weight diffs: [[.5, 0], [-.75, -.25]] -> 1*.25 + 2*0 + .5*.5625 + 0 = .53125
    # bias diffs:   [.1, -.2]              -> 4*.01 + .25*.04         = .05
    expected = lam * (0.53125 + 0.05)
    pen = ewc.penalty(model, None, None, torch.zeros(()))
    assert pen.item() == pytest.approx(expected, rel=1e-6)
    pen.backward()
    assert close(model.weight.grad, 2 * lam * F["weight"] * (model.weight.detach() - anchor["weight"]))
    assert close(model.bias.grad, 2 * lam * F["bias"] * (model.bias.detach() - anchor["bias"]))


def test_no_penalty_before_any_experience_and_none_at_the_anchor():
    model = linear()
    ewc = EWC(10.0)
    assert ewc.penalty(model, None, None, torch.zeros(())).item() == 0.0
    ewc.after_experience(model, BATCHES)
    pen = ewc.penalty(model, None, None, torch.zeros(()))
    assert pen.item() == 0.0 and pen.requires_grad


def test_negative_lambda_is_refused():
    with pytest.raises(ValueError, match="lambda"):
        EWC(-1.0)


W1 = [[-0.3, 0.2], [1.0, -0.5]]
B1 = [0.0, 0.4]
W2 = [[0.1, 0.1], [-0.2, 0.3]]
B2 = [0.5, 0.5]


def hand_penalty(lam, terms, model) -> float:
    p = {"weight": model.weight.detach(), "bias": model.bias.detach()}
    return lam * sum(float((f[k] * (p[k] - a[k]) ** 2).sum()) for f, a in terms for k in f)


def two_experiences(ewc: EWC):
    """Experience 0 ends at (W0, B0) on BATCHES[0]; experience 1 at (W1, B1) on BATCHES[1]."""
    ewc.after_experience(linear(W0, B0), BATCHES[:1])
    ewc.after_experience(linear(W1, B1), BATCHES[1:])
    f0, f1 = hand_fisher(W0, B0, BATCHES[:1]), hand_fisher(W1, B1, BATCHES[1:])
    a0 = {"weight": torch.tensor(W0), "bias": torch.tensor(B0)}
    a1 = {"weight": torch.tensor(W1), "bias": torch.tensor(B1)}
    return f0, f1, a0, a1


def test_separate_mode_keeps_one_fisher_and_anchor_per_experience_and_sums():
    ewc = EWC(2.0, mode="separate")
    f0, f1, a0, a1 = two_experiences(ewc)
    assert len(ewc.fishers) == len(ewc.anchors) == 2
    for got, want in ((ewc.fishers[0], f0), (ewc.fishers[1], f1), (ewc.anchors[0], a0), (ewc.anchors[1], a1)):
        assert all(close(got[k], want[k]) for k in want)
    model = linear(W2, B2)
    expected = hand_penalty(2.0, [(f0, a0), (f1, a1)], model)
    assert ewc.penalty(model, None, None, torch.zeros(())).item() == pytest.approx(expected, rel=1e-5)


def test_online_mode_accumulates_decayed_fisher_anchored_at_latest_parameters():
    decay = 0.5
    ewc = EWC(2.0, mode="online", decay=decay)
    f0, f1, _, a1 = two_experiences(ewc)
    assert len(ewc.fishers) == len(ewc.anchors) == 1
    running = {k: decay * f0[k] + f1[k] for k in f0}
    assert all(close(ewc.fishers[0][k], running[k]) for k in running)
    assert all(torch.equal(ewc.anchors[0][k], a1[k]) for k in a1)
    model = linear(W2, B2)
    expected = hand_penalty(2.0, [(running, a1)], model)
    assert ewc.penalty(model, None, None, torch.zeros(())).item() == pytest.approx(expected, rel=1e-5)
    # a third experience: F <- decay * F + F_new again, anchor moves to the newest parameters
    ewc.after_experience(linear(W2, B2), BATCHES)
    f2 = hand_fisher(W2, B2, BATCHES)
    assert all(close(ewc.fishers[0][k], decay * running[k] + f2[k]) for k in f2)
    assert torch.equal(ewc.anchors[0]["weight"], torch.tensor(W2))


def test_online_mode_without_decay_sums_fishers():
    ewc = EWC(1.0, mode="online")
    f0, f1, _, _ = two_experiences(ewc)
    assert all(close(ewc.fishers[0][k], f0[k] + f1[k]) for k in f0)


@pytest.mark.parametrize("mode", ["separate", "online"])
def test_state_dict_round_trip_gives_identical_penalty(mode):
    ewc = EWC(5.0, mode=mode, decay=0.7)
    two_experiences(ewc)
    state = ewc.state_dict()
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    fresh = EWC(5.0, mode=mode, decay=0.7)
    fresh.load_state_dict(copy.deepcopy(state))
    model = linear(W2, B2)
    a = ewc.penalty(model, None, None, torch.zeros(()))
    b = fresh.penalty(model, None, None, torch.zeros(()))
    assert a.item() > 0 and torch.equal(a, b)
    # and it keeps accumulating the same way after loading
    ewc.after_experience(model, BATCHES)
    fresh.after_experience(model, BATCHES)
    assert torch.equal(ewc.penalty(linear(), None, None, torch.zeros(())),
                       fresh.penalty(linear(), None, None, torch.zeros(())))


def test_empty_state_round_trip():
    fresh = EWC(1.0)
    fresh.load_state_dict(EWC(1.0).state_dict())
    assert fresh.fishers == [] and fresh.anchors == []


# --------------------------------------------------------------------------- against Avalanche's EWCPlugin

MB = 32


def naive(model, plugins, optimizer=None):
    optimizer = optimizer or torch.optim.SGD(model.parameters(), lr=0.01)
    return Naive(model=model, optimizer=optimizer,
                 criterion=nn.CrossEntropyLoss(), train_mb_size=MB, train_epochs=1, eval_mb_size=512,
                 device="cpu", evaluator=EvaluationPlugin(loggers=[]), plugins=plugins)


@pytest.fixture(scope="module")
def trained_on_exp0():
    """An MLP trained on split_digits experience 0 by Naive with Avalanche's EWCPlugin and ours side by side."""
    stream = build_stream(StreamConfig(n_experiences=5), 0)
    RNGManager.set_random_seeds(0)
    model = build_model(ModelConfig(name="mlp", hidden=16), stream.input_shape, stream.n_classes, multi_head=False)
    theirs = EWCPlugin(ewc_lambda=7.0)
    ours = RegularizerPlugin(EWC(7.0, forward=avalanche_forward_fn))
    strategy = naive(model, [theirs, ours])
    with quiet_avalanche_deprecations():
        strategy.train(stream.train_stream[0], num_workers=0)
    return stream, model, theirs, ours.regularizer


def test_fisher_equals_avalanche_importances(trained_on_exp0):
    stream, model, theirs, ewc = trained_on_exp0
    imp = {k: v.data for k, v in theirs.importances[0].items()}
    assert set(imp) == {k for k, _ in model.named_parameters()}
    # ours through the plugin (computed right after Avalanche's, on the same model)
    assert set(ewc.fishers[0]) == set(imp)
    for k, v in imp.items():
        assert close(ewc.fishers[0][k], v), k
    assert any(v.abs().sum() > 0 for v in imp.values())
    # ours called directly, on the experience's data in Avalanche's batch order
    data = stream.train_stream[0].dataset.eval()
    loader = torch.utils.data.DataLoader(data, batch_size=MB, shuffle=False,
                                         collate_fn=getattr(data, "collate_fn", None))
    direct = empirical_fisher(model, ((b[0], b[1], b[-1]) for b in loader), avalanche_forward_fn)
    for k, v in imp.items():
        assert close(direct[k], v), k


def test_penalty_equals_avalanche_penalty_on_a_perturbed_model(trained_on_exp0):
    _, model, theirs, ewc = trained_on_exp0
    # a fresh copy (not copy.deepcopy: see test_plugin.py's test_model_can_be_deep_copied_after_training)
    perturbed = build_model(ModelConfig(name="mlp", hidden=16), (1, 8, 8), 10, multi_head=False)
    perturbed.load_state_dict(model.state_dict())
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in perturbed.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    ours = ewc.penalty(perturbed, None, None, torch.zeros(()))
    # Avalanche's formula (before_backward), from its saved_params and importances
    formula = theirs.ewc_lambda * sum(
        (theirs.importances[0][k].data * (p - theirs.saved_params[0][k].data) ** 2).sum()
        for k, p in perturbed.named_parameters()
    )
    # ... and its own before_backward, on a stand-in for the strategy on experience 1
    fake = SimpleNamespace(clock=SimpleNamespace(train_exp_counter=1), device="cpu",
                           model=perturbed, loss=torch.zeros(()))
    theirs.before_backward(fake)
    assert ours.item() > 0
    assert close(ours, formula)
    assert close(ours, fake.loss)


def test_results_in_the_same_range_as_avalanche_ewc_on_permuted_digits():
    stream = build_stream(StreamConfig(name="permuted_digits", n_experiences=3), 0)
    lam = 1000.0  # large enough to matter: without EWC this run ends near 0.42, with it near 0.52
    accs = {}
    for who in ("ours", "avalanche"):
        RNGManager.set_random_seeds(0)
        model = build_model(ModelConfig(name="mlp", hidden=32), stream.input_shape, stream.n_classes,
                            multi_head=False)
        plugin = (RegularizerPlugin(EWC(lam, forward=avalanche_forward_fn)) if who == "ours"
                  else EWCPlugin(ewc_lambda=lam))
        strategy = naive(model, [plugin], torch.optim.Adam(model.parameters(), lr=0.01))
        with quiet_avalanche_deprecations():
            for exp in stream.train_stream:
                strategy.train(exp, num_workers=0)
        per_exp = evaluate(model, stream, range(stream.n_experiences))
        accs[who] = sum(per_exp.values()) / len(per_exp)
    assert accs["ours"] > 0.3 and accs["avalanche"] > 0.3  # both learned something: a meaningful comparison
    assert abs(accs["ours"] - accs["avalanche"]) < 0.05, accs
