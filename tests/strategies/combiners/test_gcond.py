"""strategies/combiners/gcond.py: GCond arbitration, momentum and accumulation, checked against hand computations.

Arbitration cases use max_iters=1 so exactly one pair is resolved. In the first call the stability
score is 0 for every task (no previous gradient), so the winner is the task with the larger
EMA-normalised norm: EMA_k = 0.95 * 1.0 + 0.05 * ||g_k|| (the EMA starts at 1.0).
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lifelong.strategies.combiners.gcond import GCond, GCondTrainer
from lifelong.strategies.combiners.gradients import GradientCombiner, flat_grad

D = torch.float64
TOL = {"rtol": 1e-6, "atol": 1e-6}  # the code's eps (1e-8) in denominators shifts results by ~1e-9


def t(*xs):
    return torch.tensor(xs, dtype=D)


def resolve_once(g1, g2, **kw):
    gc = GCond(max_iters=1, **kw)
    return gc, gc.resolve([g1, g2])


def test_is_a_gradient_combiner():
    gc: GradientCombiner = GCond()
    torch.testing.assert_close(gc.combine([t(1.0, 0.0), t(1.0, 1.0)]), t(2.0, 1.0))


def test_mild_conflict_cos_above_t_main():
    # g1 = (1, 0), g2 = (-7, 24): ||g2|| = 25, d = -7, cos = -0.28 (>= t_main = -0.5)
    # t = (-0.28 + 0.5) / (0 + 0.5) = 0.44, alpha = pi/2 * (1 - 0.44) = 0.28 pi, s = sin(0.28 pi)
    # winner: scaled norms 1/1 vs 25/(0.95 + 1.25) = 11.4 -> g2 wins (s_w = s_l = s here anyway)
    # g2' = g2 - s * d/||g1||^2 * g1 = (-7 + 7 s, 24)
    # g1' = g1 - s * d/||g2||^2 * g2 = (1, 0) + 7 s/625 * (-7, 24) = (1 - 49 s/625, 168 s/625)
    s = math.sin(0.28 * math.pi)
    gc, out = resolve_once(t(1.0, 0.0), t(-7.0, 24.0))
    torch.testing.assert_close(out[0], t(1 - 49 * s / 625, 168 * s / 625), **TOL)
    torch.testing.assert_close(out[1], t(-7 + 7 * s, 24.0), **TOL)
    assert gc.last_stats["winners"] == [1] and gc.last_stats["projections"] == 1
    assert gc.last_stats["min_cos"] == pytest.approx(-0.28)


def test_strong_conflict_between_t_crit_and_t_main():
    # g1 = (1, 0), g2 = (-3, 4): ||g2|| = 5, d = -3, cos = -0.6 (t_crit = -0.8 < cos < t_main = -0.5)
    # t = (-0.6 + 0.5) / (-0.8 + 0.5) = 1/3, alpha = pi/2 + pi/2 * (1/3)^2 = 5 pi / 9 (100 degrees)
    # winner g2 (5/1.2 = 4.17 vs 1/1): s_w = sin(5 pi/9) = 0.98481, s_l = sin(pi/2) = 1
    # g2' = g2 - s_w * (-3)/1 * (1, 0)   = (-3 + 3 s_w, 4) = (-0.04558, 4)
    # g1' = g1 - 1 * (-3)/25 * (-3, 4)   = (1 - 9/25, 12/25) = (0.64, 0.48): fully projected
    s_w = math.sin(5 * math.pi / 9)
    gc, out = resolve_once(t(1.0, 0.0), t(-3.0, 4.0))
    torch.testing.assert_close(out[0], t(0.64, 0.48), **TOL)
    torch.testing.assert_close(out[1], t(-3 + 3 * s_w, 4.0), **TOL)
    assert gc.effective_alpha(-0.6) == pytest.approx(5 * math.pi / 9)
    assert gc.last_stats["winners"] == [1]


def test_critical_conflict_cos_below_t_crit():
    # g1 = (1, 0), g2 = (-12, 5): ||g2|| = 13, d = -12, cos = -12/13 = -0.923 (<= t_crit)
    # alpha = pi: s_w = sin(pi) = 0 -> winner g2 kept; s_l = 1 -> loser fully projected:
    # g1' = (1, 0) - (-12)/169 * (-12, 5) = (1 - 144/169, 60/169) = (25/169, 60/169)
    gc, out = resolve_once(t(1.0, 0.0), t(-12.0, 5.0))
    torch.testing.assert_close(out[0], t(25 / 169, 60 / 169), **TOL)
    torch.testing.assert_close(out[1], t(-12.0, 5.0), **TOL)
    assert torch.dot(out[0], out[1]).abs() < 1e-6  # loser now orthogonal to the winner
    assert gc.effective_alpha(-0.95) == math.pi


def test_picks_the_lowest_cosine_pair_among_three():
    # cos(g0, g1) = 0, cos(g0, g2) = -1/sqrt(1.04) = -0.98, cos(g1, g2) = -0.2/sqrt(1.04) = -0.196
    # -> pair (0, 2) first; g1 untouched by that iteration
    g = [t(1.0, 0.0, 0.0), t(0.0, 1.0, 0.0), t(-1.0, -0.2, 0.0)]
    gc = GCond(max_iters=1)
    out = gc.resolve(g)
    assert gc.last_stats["pairs"] == [(0, 2)]
    assert gc.last_stats["min_cos"] == pytest.approx(-1 / math.sqrt(1.04))
    assert out[1].tolist() == [0.0, 1.0, 0.0]
    # g0 (the loser) conflicts with both others in their plane: it is projected alternately off g2
    # and g1 and shrinks, so the loop runs to its cap of 2N = 6 iterations; the winners are kept
    gc = GCond()
    out = gc.resolve(g)
    assert gc.last_stats["iterations"] == 6
    assert gc.last_stats["pairs"] == [(0, 2), (0, 1)] * 3 and gc.last_stats["winners"] == [2, 1] * 3
    torch.testing.assert_close(out[1:], torch.stack(g[1:]), **TOL)
    assert out[0].norm() < 1e-3


def test_aligned_gradients_stop_at_once_unchanged():
    # all pairwise cosines >= t_weak = 0: one pair search, nothing projected, sum of the inputs
    g = [t(1.0, 0.0), t(1.0, 1.0), t(0.0, 2.0)]
    gc = GCond()
    out = gc.resolve(g)
    torch.testing.assert_close(out, torch.stack(g))
    assert (gc.last_stats["iterations"], gc.last_stats["projections"]) == (1, 0)
    torch.testing.assert_close(gc.combine(g), t(2.0, 3.0))


@pytest.mark.parametrize("dominance", ["readme", "code"])
def test_dominance_after_three_wins(dominance):
    # g0 = (2, 0), g1 = (-12/13, 5/13): ||g1|| = 1, d = -24/13, cos = -12/13 (critical, alpha = pi)
    # calls 1-3: task 0 wins (stability equal: 0 at call 1, then 1 for both; strength
    # 2/EMA0 > 1/EMA1 = 1), so the window holds [0, 0, 0].
    # call 4: task 0 is dominant.
    #   "readme": it wins again -> g0 kept, g1' = g1 - (-24/13)/4 * (2, 0) = (0, 5/13)
    #   "code":   it loses     -> g1 kept, g0' = (2, 0) + 24/13 * g1 = (2 - 288/169, 120/169)
    #                                                                 = (50/169, 120/169)
    g0, g1 = t(2.0, 0.0), t(-12 / 13, 5 / 13)
    gc = GCond(max_iters=1, dominance=dominance)
    for _ in range(3):
        out = gc.resolve([g0, g1])
        assert gc.last_stats["winners"] == [0]
    assert list(gc.history) == [0, 0, 0]
    out = gc.resolve([g0, g1])
    if dominance == "readme":
        assert gc.last_stats["winners"] == [0]
        torch.testing.assert_close(out, torch.stack([g0, t(0.0, 5 / 13)]), **TOL)
    else:
        assert gc.last_stats["winners"] == [1]
        torch.testing.assert_close(out, torch.stack([t(50 / 169, 120 / 169), g1]), **TOL)


def test_momentum_bias_correction():
    # step 1: m = 0.15 g1, corrected m / (1 - 0.85) = g1 exactly
    # step 2: m = 0.85 * 0.15 g1 + 0.15 g2 = 0.1275 g1 + 0.15 g2, / (1 - 0.85^2 = 0.2775)
    #         with g1 = (1, 0), g2 = (0, 1): (1275/2775, 1500/2775) = (17/37, 20/37)
    gc = GCond()
    torch.testing.assert_close(gc.momentum_step(t(1.0, 0.0)), t(1.0, 0.0))
    torch.testing.assert_close(gc.momentum_step(t(0.0, 1.0)), t(17 / 37, 20 / 37))


def test_rejects_bad_configuration():
    with pytest.raises(ValueError, match="thresholds"):
        GCond(thresholds=(-0.2, -0.5, 0.0))
    with pytest.raises(ValueError, match="dominance"):
        GCond(dominance="paper")  # type: ignore[arg-type]


# --- accumulation ----------------------------------------------------------------------------------


class TwoHeads(nn.Module):
    """Shared trunk (with dropout, so train/eval mode changes the gradient) and one head per task."""

    def __init__(self):
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Dropout(0.5))
        self.heads = nn.ModuleList([nn.Linear(4, 1), nn.Linear(4, 1)])

    def forward(self, x):
        h = self.trunk(x)
        return [head(h) for head in self.heads]


LAMBDAS = (0.7, 0.3)


def make_batches(k, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [(b, torch.randn(5, 3, generator=gen), torch.randn(5, 2, generator=gen)) for b in range(k)]


def losses_fn(log=None):
    """Pre-weighted task losses on one batch; ``log`` records which batches were forwarded."""

    def fn(model, batch):
        b, x, y = batch
        if log is not None:
            log.append(b)
        outs = model(x)
        return [lam * (o[:, 0] - y[:, i]).pow(2).mean() for i, (o, lam) in enumerate(zip(outs, LAMBDAS))]

    return fn


def autograd_of(model, task_batches):
    """Reference: one .backward() of sum_i mean_{b in task_batches[i]} L_i(b), model in eval().

    An empty ``task_batches[i]`` leaves task i out, giving one task's gradient alone."""
    model.eval()
    model.zero_grad()
    fn = losses_fn()
    total = sum(sum(fn(model, batch)[i] for batch in bs) / len(bs) for i, bs in enumerate(task_batches) if bs)
    total.backward()
    model.train()
    return flat_grad(model.parameters())


def test_sequential_accumulation_equals_gradient_of_the_summed_loss():
    torch.manual_seed(0)
    model, batches = TwoHeads(), make_batches(3)  # K = 3, N = 2: sequential needs no K % N
    trainer = GCondTrainer(2, mode="sequential")
    grads = trainer.accumulate(model, model.parameters(), losses_fn(), batches)
    # expected: grad of sum_i (1/K) sum_b L_i(b) (the code divides each loss by K), in eval() mode:
    # with dropout active (train mode) the gradients would not match
    assert model.training  # eval() only while accumulating
    torch.testing.assert_close(grads[0] + grads[1], autograd_of(model, [batches, batches]))
    torch.testing.assert_close(grads[1], autograd_of(model, [[], batches]))  # task 1 alone
    assert trainer.last_stats["backward_passes"] == 2 * 3  # N x K
    assert trainer.last_stats["task_batches"] == [[0, 1, 2], [0, 1, 2]]


def test_stochastic_mode_uses_disjoint_batches_and_k_backward_passes():
    torch.manual_seed(0)
    model, batches = TwoHeads(), make_batches(4)  # K = 4, N = 2: task 0 gets 0, 1; task 1 gets 2, 3
    log: list[int] = []
    trainer = GCondTrainer(2, mode="stochastic")
    grads = trainer.accumulate(model, model.parameters(), losses_fn(log), batches)
    assert trainer.last_stats["task_batches"] == [[0, 1], [2, 3]]
    assert sorted(log) == [0, 1, 2, 3]  # every batch forwarded once: no batch shared by two tasks
    assert trainer.last_stats["backward_passes"] == 4  # K
    torch.testing.assert_close(grads[0], autograd_of(model, [batches[:2], []]))
    torch.testing.assert_close(grads[1], autograd_of(model, [[], batches[2:]]))

    sequential = GCondTrainer(2, mode="sequential")
    sequential.accumulate(model, model.parameters(), losses_fn(), batches)
    assert sequential.last_stats["backward_passes"] == 8  # N x K


def test_stochastic_k_not_divisible_by_n_raises():
    model = TwoHeads()
    with pytest.raises(ValueError, match=r"K=3.*N=2"):
        GCondTrainer(2, mode="stochastic").accumulate(model, model.parameters(), losses_fn(), make_batches(3))


@pytest.mark.parametrize("opt", ["sgd", "adamw"])
def test_step_with_torch_optimizers(opt):
    torch.manual_seed(0)
    model = TwoHeads()
    params = list(model.parameters())
    optimizer = (
        torch.optim.SGD(params, lr=0.1)
        if opt == "sgd"
        else torch.optim.AdamW(params, lr=1e-2, betas=(0.0, 0.95))  # GCond supplies the momentum
    )
    trainer = GCondTrainer(2, mode="sequential")
    before = flat_grad_of_values(params)
    stats = trainer.step(model, params, losses_fn(), make_batches(4), optimizer)
    after = flat_grad_of_values(params)
    assert not torch.equal(before, after) and torch.isfinite(after).all()
    assert stats["backward_passes"] == 8 and "min_cos" in stats
    if opt == "sgd":  # plain SGD: the parameters moved by exactly -lr * p.grad
        torch.testing.assert_close(after - before, -0.1 * flat_grad(params))
    trainer.step(model, params, losses_fn(), make_batches(4, seed=1), optimizer)  # momentum step 2
    assert torch.isfinite(flat_grad_of_values(params)).all()


def flat_grad_of_values(params):
    return torch.cat([p.detach().reshape(-1).clone() for p in params])


def test_sequential_forward_per_task_as_the_reference_or_shared_with_the_same_gradients():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    xs = [torch.randn(5, 3) for _ in range(2)]

    def fn(m, x):
        out = m(x)
        return [out[:, 0].pow(2).mean(), (out[:, 1] - 1).abs().mean()]

    per_task = GCondTrainer(2, mode="sequential")
    shared = GCondTrainer(2, mode="sequential", share_forward=True)
    a = per_task.accumulate(model, model.parameters(), fn, xs)
    b = shared.accumulate(model, model.parameters(), fn, xs)
    assert all(torch.allclose(x, y) for x, y in zip(a, b))
    assert per_task.last_stats["forward_passes"] == 4 and shared.last_stats["forward_passes"] == 2  # N×K vs K


def test_state_dict_holds_the_hand_computed_state_and_a_copy_arbitrates_alike():
    g = GCond()
    out = g.resolve([torch.tensor([3.0, 4.0]), torch.tensor([0.0, -1.0])])  # cos = -0.8: a conflict
    state = g.state_dict()
    # EMA from 1.0 with beta 0.95: 0.95 + 0.05 * 5 = 1.2 and 0.95 + 0.05 * 1 = 1.0
    assert state["norm_ema"] == pytest.approx([1.2, 1.0]) and state["num_tasks"] == 2
    assert torch.equal(state["prev"], torch.tensor([[3.0, 4.0], [0.0, -1.0]]))  # the raw gradients
    assert state["history"] == g.last_stats["winners"][-3:] and out.shape == (2, 2)
    g.momentum_step(out.sum(0))
    copy = GCond()
    copy.load_state_dict(g.state_dict())
    torch.manual_seed(0)
    for _ in range(5):  # the dominance history, EMA and previous gradients steer later arbitrations
        grads = [torch.randn(4), torch.randn(4)]
        assert torch.equal(g.resolve(grads), copy.resolve(grads))
        assert torch.equal(g.momentum_step(grads[0]), copy.momentum_step(grads[0]))
    assert list(g.history) == list(copy.history)
