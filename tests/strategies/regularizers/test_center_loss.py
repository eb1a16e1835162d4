"""strategies/regularizers/center_loss.py: the loss, Wen et al.'s center update, freezing of centers and head rows, state."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lifelong.config import ModelConfig
from lifelong.strategies.regularizers.center_loss import CenterLoss
from lifelong.tasks.models import build_model


class Net(nn.Module):
    """features = backbone(x) (4-d), head = Linear(4, 3)."""

    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.backbone = nn.Linear(2, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        return self.head(self.backbone(x))


def test_loss_by_hand():
    cl = CenterLoss(lam=1.0, alpha=0.5, n_classes=2)
    cl.centers = torch.tensor([[0.0, 0.0], [1.0, 1.0]])
    f = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 3.0]])
    y = torch.tensor([0, 1, 1])
    # squared distances 1, 1 + 1, 4 + 4 -> 1/2 * mean = 1/2 * 11/3
    assert cl.loss(f, y).item() == pytest.approx(11 / 6)


def test_wen_center_update_by_hand():
    cl = CenterLoss(lam=1.0, alpha=0.5, n_classes=2)
    assert cl.centers is None
    # first sighting of both classes: each center starts at its class mean in the batch
    cl.update_centers(torch.tensor([[0.0, 0.0], [2.0, 0.0], [4.0, 4.0]]), torch.tensor([0, 0, 1]))
    assert cl.centers.tolist() == [[1.0, 0.0], [4.0, 4.0]]
    assert cl.seen.tolist() == [True, True]
    # class 0 only: sum_i (c0 - f_i) = ([1,0]-[3,0]) + ([1,0]-[1,2]) = [-2, -2]; / (1 + 2) = [-2/3, -2/3]
    # c0 <- [1, 0] - 0.5 * [-2/3, -2/3] = [4/3, 1/3]; c1 (absent) stays
    cl.update_centers(torch.tensor([[3.0, 0.0], [1.0, 2.0]]), torch.tensor([0, 0]))
    assert torch.allclose(cl.centers, torch.tensor([[4 / 3, 1 / 3], [4.0, 4.0]]))
    # class 1, one sample: (c1 - f) = [4, 1]; / (1 + 1) = [2, 0.5]; c1 <- [4, 4] - 0.5 * [2, 0.5] = [3, 3.75]
    cl.update_centers(torch.tensor([[0.0, 3.0]]), torch.tensor([1]))
    assert torch.allclose(cl.centers, torch.tensor([[4 / 3, 1 / 3], [3.0, 3.75]]))


def test_first_sighting_of_a_later_class_sets_it_to_the_mean():
    cl = CenterLoss(lam=1.0, alpha=0.5, n_classes=3)
    cl.update_centers(torch.tensor([[1.0, 1.0]]), torch.tensor([0]))
    assert cl.seen.tolist() == [True, False, False]
    assert cl.centers[1:].abs().sum() == 0  # not seen yet: untouched
    cl.update_centers(torch.tensor([[2.0, 0.0], [4.0, 2.0], [1.0, 1.0]]), torch.tensor([2, 2, 0]))
    assert cl.centers[2].tolist() == [3.0, 1.0]
    assert cl.centers[0].tolist() == [1.0, 1.0]  # f == c: no move


def test_frozen_classes_centers_do_not_move_and_after_experience_freezes_its_classes():
    net = Net()
    cl = CenterLoss(lam=1.0, alpha=1.0, n_classes=3)
    cl.before_experience(net, [0, 1])
    cl.update_centers(torch.tensor([[0.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]]), torch.tensor([0, 1]))
    cl.after_experience(net, [])
    assert cl.frozen.tolist() == [True, True, False]
    frozen_centers = cl.centers[:2].clone()
    cl.before_experience(net, [2])
    cl.update_centers(torch.full((3, 4), 7.0), torch.tensor([0, 1, 2]))
    assert torch.equal(cl.centers[:2], frozen_centers)
    assert cl.centers[2].tolist() == [7.0] * 4
    cl.after_experience(net, [])
    assert cl.frozen.tolist() == [True, True, True]


def test_penalty_is_lambda_times_loss_and_updates_centers_only_in_training():
    net = Net()
    cl = CenterLoss(lam=0.3, alpha=0.5, n_classes=3)
    f = torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 2.0]], requires_grad=True)
    y = torch.tensor([0, 0])
    net.train()
    # the first batch sets c0 = mean = [.5, 0, 0, 1]; distances^2 = .25 + 1, .25 + 1 -> 1/2 * 1.25
    p = cl.penalty(net, None, y, None, f)
    assert p.item() == pytest.approx(0.3 * 0.5 * 1.25)
    p.backward()
    # d/df_i of lam/2 * mean ||f_i - c||^2 = lam * (f_i - c) / B; centers are not differentiated
    c0 = torch.tensor([0.5, 0.0, 0.0, 1.0])
    assert torch.allclose(f.grad, 0.3 * (f.detach() - c0) / 2)
    net.eval()
    before = cl.centers.clone()
    cl.penalty(net, None, y, None, torch.full((2, 4), 9.0))
    assert torch.equal(cl.centers, before)


def test_penalty_requires_features():
    with pytest.raises(ValueError, match="features"):
        CenterLoss(1.0, 0.5, 3).penalty(Net(), None, torch.tensor([0]), torch.zeros(1, 3), None)


@pytest.mark.parametrize("lam, alpha", [(-1.0, 0.5), (1.0, 0.0), (1.0, 1.5)])
def test_invalid_hyperparameters_are_refused(lam, alpha):
    with pytest.raises(ValueError):
        CenterLoss(lam, alpha, 3)


def test_before_experience_refuses_a_non_linear_head():
    net = Net()
    net.head = nn.Sequential(nn.Linear(4, 3))
    with pytest.raises(ValueError, match="single-head"):
        CenterLoss(1.0, 0.5, 3).before_experience(net, [0])
    multi = build_model(ModelConfig(name="mlp", hidden=8), (1, 8, 8), 10, multi_head=True)
    with pytest.raises(ValueError, match="single-head"):
        CenterLoss(1.0, 0.5, 10).before_experience(multi, [0, 1])


def test_frozen_head_rows_get_zero_gradient():
    net = Net()
    cl = CenterLoss(1.0, 0.5, 3)
    cl.before_experience(net, [0])
    cl.after_experience(net, [])  # class 0 frozen
    cl.before_experience(net, [1, 2])
    net.zero_grad()
    net(torch.randn(5, 2)).pow(2).sum().backward()
    assert not net.head.weight.grad[0].any() and net.head.bias.grad[0] == 0
    assert net.head.weight.grad[1:].abs().sum() > 0 and net.head.bias.grad[1:].abs().sum() > 0


def test_after_update_restores_frozen_rows_that_adam_momentum_would_move():
    net = Net()
    cl = CenterLoss(1.0, 0.5, 3)
    opt = torch.optim.Adam(net.parameters(), lr=0.1)
    x = torch.randn(8, 2, generator=torch.Generator().manual_seed(1))

    def step():
        opt.zero_grad()
        net(x).pow(2).sum().backward()  # a loss on every row of the head
        opt.step()

    cl.before_experience(net, [0])
    for _ in range(3):  # experience 0: row 0 trains and Adam builds up momentum for it
        step()
        cl.after_update(net)
    cl.after_experience(net, [])
    cl.before_experience(net, [1, 2])
    rows = {k: v.detach().clone() for k, v in net.head.state_dict().items()}

    step()  # zero gradient on row 0, yet Adam's momentum moves it ...
    assert not torch.equal(net.head.weight[0], rows["weight"][0])
    cl.after_update(net)  # ... and after_update puts it back
    for _ in range(3):
        step()
        cl.after_update(net)
    assert torch.equal(net.head.weight[0], rows["weight"][0])
    assert torch.equal(net.head.bias[0], rows["bias"][0])
    assert not torch.equal(net.head.weight[1], rows["weight"][1])
    assert not torch.equal(net.head.weight[2], rows["weight"][2])
    assert not torch.equal(net.head.bias[1:], rows["bias"][1:])


def test_after_update_does_nothing_while_nothing_is_frozen():
    net = Net()
    cl = CenterLoss(1.0, 0.5, 3)
    cl.before_experience(net, [0, 1, 2])
    with torch.no_grad():
        net.head.weight.add_(1.0)
    changed = net.head.weight.detach().clone()
    cl.after_update(net)
    assert torch.equal(net.head.weight, changed)


def test_hooks_are_registered_once_per_head():
    net = Net()
    cl = CenterLoss(1.0, 0.5, 3)
    for classes in ([0], [1], [2]):
        cl.before_experience(net, classes)
    assert len(net.head.weight._backward_hooks) == 1 and len(net.head.bias._backward_hooks) == 1


def test_state_round_trip():
    net = Net()
    cl = CenterLoss(0.5, 0.5, 3)
    cl.before_experience(net, [0, 1])
    cl.update_centers(torch.tensor([[1.0, 0, 0, 0], [0, 1.0, 0, 0]]), torch.tensor([0, 1]))
    cl.after_experience(net, [])
    state = cl.state_dict()
    assert set(state) == {"seen", "frozen", "centers"}
    fresh = CenterLoss(0.5, 0.5, 3)
    fresh.load_state_dict(state)
    assert torch.equal(fresh.centers, cl.centers) and torch.equal(fresh.frozen, cl.frozen)
    state["centers"][0, 0] = 99.0  # the loaded state is a copy
    assert fresh.centers[0, 0] == 1.0
    net.eval()
    f, y = torch.tensor([[2.0, 2, 2, 2], [3.0, 3, 3, 3]]), torch.tensor([0, 1])
    assert torch.equal(cl.penalty(net, None, y, None, f), fresh.penalty(net, None, y, None, f))
    # training goes on the same way: frozen classes stay, a new class is first seen
    net.train()
    for reg in (cl, fresh):
        reg.before_experience(net, [2])
        reg.penalty(net, None, torch.tensor([0, 2]), None, torch.tensor([[5.0, 5, 5, 5], [1.0, 2, 3, 4]]))
    assert torch.equal(cl.centers, fresh.centers)
    assert fresh.centers[2].tolist() == [1.0, 2.0, 3.0, 4.0]


def test_empty_state_round_trip():
    fresh = CenterLoss(0.5, 0.5, 3)
    fresh.load_state_dict(CenterLoss(0.5, 0.5, 3).state_dict())
    assert fresh.centers is None and not fresh.seen.any()
