"""strategies/regularizers/l2.py: L2 toward the previous (or initial) parameters, backbone only by default."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lifelong.config import ModelConfig
from lifelong.strategies.regularizers.l2 import L2
from lifelong.tasks.models import build_model

OUT = torch.zeros(())  # ``out`` only gives the penalty's dtype and device


class Tiny(nn.Module):
    """backbone: Linear(2, 2); head: Linear(2, 1) — every value set by hand."""

    def __init__(self):
        super().__init__()
        self.backbone = nn.Linear(2, 2)
        self.head = nn.Linear(2, 1)
        self.set([[1.0, 2.0], [3.0, 4.0]], [0.5, -0.5], [[1.0, -1.0]], [0.0])

    def set(self, bw, bb, hw, hb):
        with torch.no_grad():
            self.backbone.weight.copy_(torch.tensor(bw))
            self.backbone.bias.copy_(torch.tensor(bb))
            self.head.weight.copy_(torch.tensor(hw))
            self.head.bias.copy_(torch.tensor(hb))
        return self

    def forward(self, x):
        return self.head(self.backbone(x))


def moved(model: Tiny) -> Tiny:
    """Backbone moved by: weight [[+1, 0], [0, -2]] (sq. sum 5), bias [+0.5, 0] (0.25): 5.25 in all.
    Head moved by: weight [[0, +3]] (9), bias [-1] (1): 10 in all."""
    return model.set([[2.0, 2.0], [3.0, 2.0]], [1.0, -0.5], [[1.0, 2.0]], [-1.0])


def pen(reg, model) -> float:
    return reg.penalty(model, None, None, OUT).item()


def test_no_penalty_before_an_anchor_exists():
    model = Tiny()
    reg = L2(0.5)  # anchor="previous": nothing before the first experience ends
    reg.before_experience(model, [0, 1])
    assert reg.anchor == {}
    moved(model)
    p = reg.penalty(model, None, None, OUT)
    assert p.item() == 0.0 and p.shape == ()


def test_previous_anchor_penalty_over_backbone_only_by_hand():
    model = Tiny()
    reg = L2(0.5)
    reg.after_experience(model, [])
    assert set(reg.anchor) == {"backbone.weight", "backbone.bias"}
    assert pen(reg, model) == 0.0
    moved(model)
    assert pen(reg, model) == pytest.approx(0.5 * 5.25)


@pytest.mark.parametrize("scope, expected", [("backbone", 5.25), ("head", 10.0), ("all", 15.25)])
def test_scopes(scope, expected):
    model = Tiny()
    reg = L2(2.0, scope=scope)
    reg.after_experience(model, [])
    names = {"backbone": {"backbone.weight", "backbone.bias"}, "head": {"head.weight", "head.bias"}}
    names["all"] = names["backbone"] | names["head"]
    assert set(reg.anchor) == names[scope]
    assert pen(reg, moved(model)) == pytest.approx(2.0 * expected)


def test_gradient_is_2_eps_times_difference_and_head_gets_none():
    model = Tiny()
    reg = L2(0.5)
    reg.after_experience(model, [])
    anchor_w = model.backbone.weight.detach().clone()
    anchor_b = model.backbone.bias.detach().clone()
    moved(model)
    reg.penalty(model, None, None, OUT).backward()
    assert torch.allclose(model.backbone.weight.grad, 2 * 0.5 * (model.backbone.weight.detach() - anchor_w))
    assert torch.allclose(model.backbone.bias.grad, 2 * 0.5 * (model.backbone.bias.detach() - anchor_b))
    assert model.head.weight.grad is None and model.head.bias.grad is None


def test_anchor_is_a_copy_not_the_live_parameters():
    model = Tiny()
    reg = L2(1.0)
    reg.after_experience(model, [])
    with torch.no_grad():
        model.backbone.weight.add_(1.0)  # in place: an aliased anchor would follow
    assert pen(reg, model) == pytest.approx(4.0)


def test_previous_anchor_updates_at_every_after_experience():
    model = Tiny()
    reg = L2(1.0)
    reg.after_experience(model, [])
    moved(model)
    reg.before_experience(model, [2, 3])  # does not move a "previous" anchor
    assert pen(reg, model) == pytest.approx(5.25)
    reg.after_experience(model, [])  # now anchored at the moved parameters
    assert pen(reg, model) == 0.0
    assert torch.equal(reg.anchor["backbone.weight"], torch.tensor([[2.0, 2.0], [3.0, 2.0]]))


def test_initial_anchor_snapshots_at_before_experience_and_keeps_it():
    model = Tiny()
    reg = L2(1.0, anchor="initial")
    reg.before_experience(model, [0, 1])
    assert torch.equal(reg.anchor["backbone.weight"], torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
    moved(model)
    assert pen(reg, model) == pytest.approx(5.25)
    reg.after_experience(model, [])  # an "initial" anchor does not follow the model ...
    reg.before_experience(model, [2, 3])  # ... nor is it taken again
    assert pen(reg, model) == pytest.approx(5.25)
    assert torch.equal(reg.anchor["backbone.weight"], torch.tensor([[1.0, 2.0], [3.0, 4.0]]))


@pytest.mark.parametrize("anchor", ["previous", "initial"])
def test_state_round_trip(anchor):
    model = Tiny()
    reg = L2(0.7, anchor=anchor)
    reg.before_experience(model, [0, 1])
    reg.after_experience(model, [])
    state = reg.state_dict()
    assert set(state) == {"anchor/backbone.weight", "anchor/backbone.bias"}
    fresh = L2(0.7, anchor=anchor)
    fresh.load_state_dict({k: v.clone() for k, v in state.items()})
    moved(model)
    assert torch.equal(reg.penalty(model, None, None, OUT), fresh.penalty(model, None, None, OUT))
    # a loaded "initial" anchor is kept: the next experience does not re-snapshot it
    fresh.before_experience(model, [2, 3])
    assert pen(fresh, model) == pytest.approx(0.7 * 5.25)


def test_negative_eps_is_refused():
    with pytest.raises(ValueError, match="eps"):
        L2(-0.1)


def test_real_models_exclude_their_head():
    torch.manual_seed(0)
    model = build_model(ModelConfig(name="mlp", hidden=8), (1, 8, 8), 10, multi_head=False)
    reg = L2(1.0)
    reg.after_experience(model, [])
    assert reg.anchor and not any(k.startswith("head.") for k in reg.anchor)
    assert set(reg.anchor) == {k for k, _ in model.backbone.named_parameters(prefix="backbone")}
    with torch.no_grad():
        model.head.weight.add_(5.0)
    assert pen(reg, model) == 0.0
    with torch.no_grad():
        model.backbone[2].bias.add_(1.0)  # (backbone[0] standardises, [1] flattens)
    assert pen(reg, model) == pytest.approx(8.0)  # 8 hidden units moved by 1


def test_wrapper_prefix_is_ignored_so_state_lines_up():
    """An Opacus-style wrapper (``_module.``) sees the same anchor names as the bare model."""

    class Wrapped(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self._module = inner

    bare = Tiny()
    reg = L2(1.0)
    reg.after_experience(bare, [])
    wrapped = Wrapped(moved(Tiny()))
    assert pen(reg, wrapped) == pytest.approx(5.25)
