"""tasks/health.py: the probe that tells a model that stopped learning from one that forgot."""

import math

import pytest
import torch
from torch import nn

from lifelong.tasks.health import DEAD_SHARE, LEARNED_MARGIN, Health, probe


def logits_forward(model, x, t):
    return model(x)


class Fixed(nn.Module):
    """Logits given per sample; one ReLU whose units fire as ``alive`` says."""

    def __init__(self, logits: torch.Tensor, alive: torch.Tensor):
        super().__init__()
        self.logits, self.alive = logits, alive
        self.relu = nn.ReLU()
        self.w = nn.Parameter(torch.zeros(1))

    def forward(self, x):
        self.relu(self.alive.float().expand(len(x), -1) * 2 - 1)  # fires only where alive
        return self.logits[: len(x)] + self.w


def test_within_experience_accuracy_ignores_other_classes_logits():
    # 4 samples of classes 2 and 3; class 7 (another experience) has the largest logit everywhere
    y = torch.tensor([2, 3, 2, 3])
    logits = torch.full((4, 10), -5.0)
    logits[:, 7] = 9.0
    logits[torch.arange(4), torch.tensor([2, 3, 3, 3])] = 1.0  # right, right, wrong, right
    h = probe(Fixed(logits, torch.ones(4, dtype=torch.bool)), logits_forward, torch.zeros(4, 1), y,
              torch.zeros(4, dtype=torch.long), [2, 3], "exp1")
    assert h.within_accuracy == pytest.approx(0.75) and h.chance == 0.5 and h.n_classes == 2
    assert h.learned and h.ok and h.dead_units == 0.0


def test_a_model_that_predicts_one_class_is_not_learned_and_says_so():
    y = torch.tensor([8, 9] * 10)
    logits = torch.zeros(20, 10)
    logits[:, 8] = 1.0  # always class 8: 0.5 within the experience's two classes
    h = probe(Fixed(logits, torch.tensor([True, False, False, False])), logits_forward, torch.zeros(20, 1), y,
              torch.zeros(20, dtype=torch.long), [8, 9], "exp4")
    assert h.within_accuracy == 0.5 and not h.learned
    assert h.problems == ["exp4: not learned — accuracy 0.500 within its 2 classes, chance 0.500"]
    assert h.dead_units == 0.75


def test_margin_dead_units_nonfinite_and_vanished_updates():
    base = {"where": "exp0", "chance": 0.5, "n_classes": 2, "dead_units": 0.0, "nonfinite": False}
    edge = 0.5 + LEARNED_MARGIN * 0.5
    assert Health(within_accuracy=edge, **base).learned
    assert not Health(within_accuracy=edge - 0.01, **base).learned
    assert Health(within_accuracy=0.2, **{**base, "chance": 0.1, "n_classes": 10}).learned  # ≥ 0.19
    dead = Health(within_accuracy=0.9, **{**base, "dead_units": DEAD_SHARE})
    assert dead.problems == ["exp0: 90% of ReLU units never fire"]
    assert Health(within_accuracy=0.9, **{**base, "nonfinite": True}).problems == [
        "exp0: non-finite weights or outputs"]
    assert not Health(within_accuracy=0.9, update_norm=0.0, **base).ok
    assert not Health(within_accuracy=0.9, update_norm=math.inf, **base).ok
    assert Health(within_accuracy=0.9, update_norm=0.3, **base).metrics()["health/update_norm"] == 0.3


def test_nonfinite_weights_are_found():
    model = nn.Linear(3, 2)
    with torch.no_grad():
        model.weight[0, 0] = float("nan")
    h = probe(model, logits_forward, torch.ones(4, 3), torch.tensor([0, 1, 0, 1]), torch.zeros(4, dtype=torch.long),
              [0, 1], "exp0")
    assert h.nonfinite and math.isnan(h.dead_units)  # no ReLU: no dead-unit figure
