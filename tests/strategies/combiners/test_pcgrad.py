"""strategies/combiners/pcgrad.py (PCGrad, Yu et al. 2020) and the helpers of strategies/combiners/gradients.py."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lifelong.strategies.combiners.gradients import (
    GradientCombiner,
    WeightedSum,
    flat_grad,
    task_gradients,
    write_grad,
)
from lifelong.strategies.combiners.pcgrad import PCGrad

D = torch.float64


def t(*xs):
    return torch.tensor(xs, dtype=D)


def test_satisfies_the_combiner_protocol():
    combiners: list[GradientCombiner] = [PCGrad(seed=0), WeightedSum()]
    for c in combiners:
        assert c.combine([t(1.0, 0.0), t(0.0, 1.0)]).shape == (2,)


def test_orthogonal_gradients_unchanged():
    # g1 . g2 = 0: no conflict (the test is dot < 0), the sum is (1, 1)
    pc = PCGrad(seed=0)
    torch.testing.assert_close(pc.combine([t(1.0, 0.0), t(0.0, 1.0)]), t(1.0, 1.0))
    assert pc.last_stats["projections"] == 0


def test_aligned_gradients_unchanged():
    # (1, 2) . (2, 1) = 4 > 0: sum (3, 3)
    torch.testing.assert_close(PCGrad(seed=0).combine([t(1.0, 2.0), t(2.0, 1.0)]), t(3.0, 3.0))


def test_exactly_opposed_gradients_both_vanish():
    # g1 = (1, 2), g2 = -g1: g1 . g2 = -5, ||g2||^2 = 5
    # g1' = g1 - (-5/5) g2 = (1, 2) + (-1, -2) = 0; symmetrically g2' = 0; sum 0
    pc = PCGrad(seed=0)
    projected = pc.project([t(1.0, 2.0), t(-1.0, -2.0)])
    torch.testing.assert_close(projected, torch.zeros(2, 2, dtype=D))
    assert pc.last_stats["projections"] == 2


def test_textbook_formula_on_two_conflicting_tasks():
    # g1 = (1, 0), g2 = (-1, 1): g1 . g2 = -1
    # g1' = g1 - (-1)/||g2||^2 g2 = (1, 0) + 1/2 (-1, 1) = (0.5, 0.5)
    # g2' = g2 - (-1)/||g1||^2 g1 = (-1, 1) + (1, 0)     = (0, 1)
    # each projection is orthogonal to the other ORIGINAL gradient; sum (0.5, 1.5)
    pc = PCGrad(seed=0)
    projected = pc.project([t(1.0, 0.0), t(-1.0, 1.0)])
    torch.testing.assert_close(projected, torch.stack([t(0.5, 0.5), t(0.0, 1.0)]))
    torch.testing.assert_close(pc.combine([t(1.0, 0.0), t(-1.0, 1.0)]), t(0.5, 1.5))
    assert PCGrad(seed=0, reduction="mean").combine([t(1.0, 0.0), t(-1.0, 1.0)]).tolist() == [0.25, 0.75]


def libmtl_pcgrad(grads: torch.Tensor, orders: list[list[int]]) -> torch.Tensor:
    """LibMTL/weighting/PCGrad.py's loop, rewritten by hand, with the visiting orders given.

    LibMTL: pc = grads.clone(); for each i, for j in a shuffled task list:
        g_ij = dot(pc[i], grads[j]); if g_ij < 0: pc[i] -= g_ij * grads[j] / ||grads[j]||^2
    then pc.sum(0). (LibMTL's list also holds i itself; that term never fires here, see pcgrad.py.)
    """
    pc = grads.clone()
    for i, order in enumerate(orders):
        for j in order:
            g_ij = torch.dot(pc[i], grads[j])
            if g_ij < 0:
                pc[i] -= g_ij * grads[j] / grads[j].norm().pow(2)
    return pc.sum(0)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_libmtl_formula_on_random_conflicting_gradients(seed):
    gen = torch.Generator().manual_seed(100 + seed)
    grads = torch.randn(4, 8, generator=gen, dtype=D)
    grads[1] = -0.7 * grads[0] + 0.3 * grads[1]  # make sure some pairs conflict
    pc = PCGrad(seed=seed)
    out = pc.combine(list(grads))
    assert pc.last_stats["projections"] > 0
    for i, order in enumerate(pc.last_stats["orders"]):
        assert sorted(order) == [j for j in range(4) if j != i]
    torch.testing.assert_close(out, libmtl_pcgrad(grads, pc.last_stats["orders"]))


def test_seed_makes_the_random_order_reproducible():
    grads = list(torch.randn(5, 6, generator=torch.Generator().manual_seed(3), dtype=D))
    a, b = PCGrad(seed=7), PCGrad(seed=7)
    torch.testing.assert_close(a.combine(grads), b.combine(grads))
    assert a.last_stats["orders"] == b.last_stats["orders"]


def test_inputs_not_modified():
    g1, g2 = t(1.0, 0.0), t(-1.0, 1.0)
    PCGrad(seed=0).combine([g1, g2])
    assert g1.tolist() == [1.0, 0.0] and g2.tolist() == [-1.0, 1.0]


# --- strategies/combiners/gradients.py ------------------------------------------------------------------------


def test_weighted_sum():
    # plain: (1, 0) + (0, 2) = (1, 2); weighted 0.5, 2: (0.5, 4)
    assert WeightedSum().combine([t(1.0, 0.0), t(0.0, 2.0)]).tolist() == [1.0, 2.0]
    assert WeightedSum([0.5, 2.0]).combine([t(1.0, 0.0), t(0.0, 2.0)]).tolist() == [0.5, 4.0]
    with pytest.raises(ValueError, match="2 weights for 3"):
        WeightedSum([1.0, 1.0]).combine([t(1.0), t(1.0), t(1.0)])


def test_task_gradients_flat_grad_write_grad_round_trip():
    torch.manual_seed(0)
    trunk, head_a, head_b = nn.Linear(3, 2), nn.Linear(2, 1), nn.Linear(2, 1)
    params = [*trunk.parameters(), *head_a.parameters(), *head_b.parameters()]
    x = torch.randn(5, 3)
    h = trunk(x)
    losses = [head_a(h).pow(2).mean(), head_b(h).abs().mean()]
    grads = task_gradients(params, losses)  # two backward passes through one shared graph
    assert all(p.grad is None for p in params)  # autograd.grad leaves p.grad alone
    # reference: .backward() of each loss alone
    for loss, g in zip(losses, grads):
        for p in params:
            p.grad = None
        loss.backward(retain_graph=True)
        torch.testing.assert_close(g, flat_grad(params))
    # head_b's parameters get zeros in task a's gradient (last 3 entries: weight 1x2, bias 1)
    assert grads[0][-3:].abs().sum() == 0
    write_grad(params, grads[0] + grads[1])
    torch.testing.assert_close(flat_grad(params), grads[0] + grads[1])
    assert params[0].grad.shape == params[0].shape
    with pytest.raises(ValueError, match="entries"):
        write_grad(params, torch.zeros(3))
