"""strategies/regularizers/feature_distillation.py against a hand-computed case (Smith et al. 2022, FeatKD)."""

import pytest
import torch
from torch import nn

from lifelong.config import load_config
from lifelong.strategies.regularizers.feature_distillation import FeatureDistillation


class Tiny(nn.Module):
    def __init__(self, w):
        super().__init__()
        self.backbone = nn.Linear(2, 2, bias=False)
        self.head = nn.Linear(2, 3)
        with torch.no_grad():
            self.backbone.weight.copy_(torch.tensor(w))

    def features(self, x):
        return self.backbone(x)

    def forward(self, x):
        return self.head(self.features(x))


def test_penalty_is_mu_times_the_mean_squared_feature_distance_to_the_previous_model():
    model = Tiny([[1.0, 0.0], [0.0, 1.0]])
    reg = FeatureDistillation(mu=0.5)
    reg.before_experience(model, [0, 1])
    reg.after_experience(model, [])  # teacher: identity features
    with torch.no_grad():
        model.backbone.weight.copy_(torch.tensor([[2.0, 0.0], [0.0, 1.0]]))  # f(x) = (2 x0, x1)
    x = torch.tensor([[1.0, 2.0], [3.0, -1.0]])
    out = model(x)
    # differences (x0, 0): squares 1 and 9 over 2 samples × 2 dims → mean 10/4; × 0.5
    assert float(reg.penalty(model, x, None, out).detach()) == pytest.approx(0.5 * 10 / 4)
    # the captured head input is used when given (the plugin's pre-hook), and gets the gradient
    features = model.features(x)
    penalty = reg.penalty(model, x, None, out, features)
    penalty.backward()
    # d/dW00 of 0.5 * mean((W00 x0 - x0)^2) = 0.5 * 2 * (W00 - 1) * sum(x0^2) / 4 = 0.5 * 2 * 1 * 10 / 4
    assert float(model.backbone.weight.grad[0, 0]) == pytest.approx(2.5)
    assert float(model.backbone.weight.grad[1, 1]) == 0.0


def test_the_first_experience_distils_toward_the_starting_model_and_state_round_trips():
    model = Tiny([[1.0, 0.0], [0.0, 1.0]])
    reg = FeatureDistillation(mu=1.0)
    x = torch.tensor([[1.0, 1.0]])
    assert float(reg.penalty(model, x, None, model(x)).detach()) == 0.0  # no teacher before any experience
    reg.before_experience(model, [0, 1])  # the teacher: the model the learner starts from
    with torch.no_grad():
        model.backbone.weight.mul_(3.0)
    assert float(reg.penalty(model, x, None, model(x)).detach()) == pytest.approx(((3 - 1) ** 2 + (3 - 1) ** 2) / 2)
    restored = FeatureDistillation(mu=1.0)
    restored.load_state_dict(reg.state_dict())
    assert float(restored.penalty(model, x, None, model(x)).detach()) == pytest.approx(4.0)
    restored.before_experience(model, [2])  # a restored teacher is kept, not replaced by the current model
    assert float(restored.penalty(model, x, None, model(x)).detach()) == pytest.approx(4.0)
    assert not any(p.requires_grad for p in restored._frozen(model).parameters())


def test_config_names_it_and_sample_dp_refuses_it():
    cfg = load_config(None, ['strategies=[{name="naive", plugins=[{name="feature_distillation", mu=2.0}]}]'])
    assert cfg.strategies[0].plugins[0].mu == 2.0
    with pytest.raises(Exception, match="feature_distillation"):
        load_config(None, ['strategies=[{name="naive", plugins=[{name="feature_distillation"}]}]',
                           "privacy.sample.noise_multiplier=1.0"])


def test_it_trains_inside_an_avalanche_learner_whose_head_is_hooked():
    """The teacher is copied while the plugin's hook on the head holds the batch's features (a
    tensor of the graph, which deepcopy refuses): the copy leaves hooks out."""
    from avalanche.training.plugins import EvaluationPlugin

    from lifelong.bridges.avalanche.learners import build_learner, quiet_avalanche_deprecations
    from lifelong.config import validate_config
    from lifelong.tasks.models import build_model
    from lifelong.tasks.streams import build_stream

    cfg = validate_config({"model": {"name": "mlp", "hidden": 16}, "training": {"epochs": 1},
                           "strategies": [{"name": "naive", "plugins": [{"name": "feature_distillation"}]}]})
    stream = build_stream(cfg.stream, 0)
    torch.manual_seed(0)
    model = build_model(cfg.model, stream.input_shape, stream.n_classes, multi_head=False)
    strategy = build_learner(cfg.strategies[0], model, cfg.training, [], EvaluationPlugin(loggers=[]),
                             stream.n_classes, cfg.seed)
    with quiet_avalanche_deprecations():
        for exp in stream.train_stream[:2]:
            strategy.train(exp, num_workers=0)
    (plugin,) = [p for p in strategy.plugins if getattr(p, "name", None) == "feature_distillation"]
    assert plugin.last_penalty > 0 and plugin.regularizer.teacher_state
    teacher = plugin.regularizer._frozen(model)
    assert not teacher.head._forward_pre_hooks
