"""bridges/avalanche/logit_mask.py: an experience's loss sees only its own classes' logits."""

import pytest
import torch
from avalanche.training.plugins import EvaluationPlugin

from lifelong.bridges.avalanche.learners import build_learner, quiet_avalanche_deprecations
from lifelong.bridges.avalanche.logit_mask import PastLogitMaskPlugin
from lifelong.config import ConfigError, load_config, validate_config
from lifelong.tasks.models import build_model
from lifelong.tasks.streams import build_stream


def _learner(mask: bool):
    cfg = validate_config({"model": {"name": "mlp", "hidden": 16},
                           "training": {"epochs": 1, "optimizer": "sgd", "lr": 0.1},
                           "strategies": [{"name": "naive", "mask_past_logits": mask}]})
    stream = build_stream(cfg.stream, 0)
    torch.manual_seed(0)
    model = build_model(cfg.model, stream.input_shape, stream.n_classes, multi_head=False)
    strategy = build_learner(cfg.strategies[0], model, cfg.training, [], EvaluationPlugin(loggers=[]),
                             stream.n_classes, cfg.seed)
    return stream, model, strategy


@pytest.mark.parametrize("mask", [True, False])
def test_masked_training_leaves_other_classes_head_rows_untouched(mask):
    stream, model, strategy = _learner(mask)
    assert any(isinstance(p, PastLogitMaskPlugin) for p in strategy.plugins) is mask
    with quiet_avalanche_deprecations():
        strategy.train(stream.train_stream[0], num_workers=0)  # classes 0 and 1
        before = model.head.weight.detach().clone()
        strategy.train(stream.train_stream[1], num_workers=0)  # classes 2 and 3
    moved = (model.head.weight.detach() - before).abs().sum(1) > 0
    # masked: only the current experience's rows learn (−∞ logits get no gradient); unmasked: all do
    assert moved.tolist() == ([False, False, True, True] + [False] * 6 if mask else [True] * 10)
    # evaluation is unmasked: the model still scores every class
    model.eval()
    assert torch.isfinite(model(stream.test_tensors(0)[0][:4])).all()


def test_mask_is_refused_where_it_does_not_apply():
    with pytest.raises(Exception, match="mask_past_logits"):
        validate_config({"strategies": [{"name": "replay", "mask_past_logits": True}]})
    with pytest.raises(ConfigError, match="mask_past_logits: not available in the federated flow"):
        load_config(None, ['flow="federated"', 'strategies=[{name="naive", mask_past_logits=true}]'])
