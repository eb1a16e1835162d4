"""bridges/avalanche/plugin.py: RegularizerPlugin in Avalanche strategies, composition from the config, OnePrompt."""

from __future__ import annotations

import copy

import pytest
import torch
from avalanche.core import SupervisedPlugin
from avalanche.training import Naive
from avalanche.training.determinism.rng_manager import RNGManager
from avalanche.training.plugins import EvaluationPlugin, LwFPlugin, ReplayPlugin
from torch import nn

from lifelong.bridges.avalanche.learners import build_learner, quiet_avalanche_deprecations
from lifelong.bridges.avalanche.plugin import RegularizerPlugin, avalanche_forward_fn, build_regularizer
from lifelong.config import (
    CenterLossSpec,
    ConfigError,
    EWCSpec,
    L2Spec,
    ModelConfig,
    OnePromptSpec,
    StreamConfig,
    TrainingConfig,
    validate_config,
)
from lifelong.strategies.regularizers.center_loss import CenterLoss
from lifelong.strategies.regularizers.ewc import EWC
from lifelong.strategies.regularizers.l2 import L2
from lifelong.tasks.models import build_model
from lifelong.tasks.streams import build_stream

pytestmark = pytest.mark.filterwarnings("ignore:No loggers specified")

MB = 32


def digits():
    return build_stream(StreamConfig(n_experiences=5), 0)


def mlp(stream, hidden=16):
    RNGManager.set_random_seeds(0)
    return build_model(ModelConfig(name="mlp", hidden=hidden), stream.input_shape, stream.n_classes, multi_head=False)


def naive(model, plugins):
    return Naive(model=model, optimizer=torch.optim.Adam(model.parameters(), lr=0.01),
                 criterion=nn.CrossEntropyLoss(), train_mb_size=MB, train_epochs=1, eval_mb_size=512,
                 device="cpu", evaluator=EvaluationPlugin(loggers=[]), plugins=plugins)


def train(strategy, experiences):
    with quiet_avalanche_deprecations():
        for exp in experiences:
            strategy.train(exp, num_workers=0)


class LossProbe(SupervisedPlugin):
    """Records ``strategy.loss`` at before_backward (placed before or after the regulariser)."""

    def __init__(self):
        super().__init__()
        self.losses: list[float] = []

    def before_backward(self, strategy, **kwargs):
        self.losses.append(float(strategy.loss.detach()))


class PenaltyProbe(SupervisedPlugin):
    def __init__(self, reg_plugin):
        super().__init__()
        self.reg_plugin = reg_plugin
        self.per_exp: dict[int, list[float]] = {}

    def after_training_iteration(self, strategy, **kwargs):
        exp = strategy.experience.current_experience
        self.per_exp.setdefault(exp, []).append(self.reg_plugin.last_penalty)


# --------------------------------------------------------------------------- RegularizerPlugin end to end


def test_ewc_plugin_penalty_is_zero_on_first_experience_and_positive_after():
    stream = digits()
    model = mlp(stream)
    reg = RegularizerPlugin(EWC(100.0, forward=avalanche_forward_fn))
    probe = PenaltyProbe(reg)
    before, after = LossProbe(), LossProbe()
    strategy = naive(model, [before, reg, after, probe])
    train(strategy, stream.train_stream[:2])
    n0 = len(probe.per_exp[0])
    assert n0 == -(-len(stream.train_stream[0].dataset) // MB)
    assert probe.per_exp[0] == [0.0] * n0
    exp1 = probe.per_exp[1]
    assert exp1[0] == 0.0  # the first step of experience 1 starts at the anchor
    assert all(p > 0 for p in exp1[1:])
    assert reg.last_penalty > 0
    # the penalty is added to the strategy's loss before backward
    diffs = [a - b for a, b in zip(after.losses[n0:], before.losses[n0:])]
    assert diffs == pytest.approx(exp1, rel=1e-5, abs=1e-7)
    assert len(reg.regularizer.fishers) == 2


class Spy:
    """A Regularizer that records what the plugin hands it."""

    def __init__(self):
        self.classes, self.batches, self.features, self.updates = [], [], [], 0

    def penalty(self, model, x, y, out, features=None):
        self.features.append((features, model.features(x).detach(), out))
        return torch.zeros((), requires_grad=False) + 0.0

    def before_experience(self, model, classes):
        self.classes.append(classes)

    def after_experience(self, model, batches):
        self.batches.append(list(batches))

    def after_update(self, model):
        self.updates += 1

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass


def test_plugin_hands_classes_features_and_experience_data_to_the_regularizer():
    stream = digits()
    model = mlp(stream)
    spy = Spy()
    strategy = naive(model, [RegularizerPlugin(spy)])
    train(strategy, stream.train_stream[:2])
    assert spy.classes == [[0, 1], [2, 3]]
    # features: the head's input of the training forward pass, and the batch's logits
    f, expected, out = spy.features[-1]
    assert f is not None and f.shape == (len(out), 16) and f.requires_grad
    assert torch.allclose(f.detach(), expected)
    n_iters = sum(-(-len(stream.train_stream[i].dataset) // MB) for i in range(2))
    assert len(spy.features) == spy.updates == n_iters
    # after_experience: the experience's whole training set, in order, in train_mb_size batches
    for i, batches in enumerate(spy.batches):
        x, y, t = (torch.cat([b[j] for b in batches]) for j in range(3))
        xs, ys, ts = stream.train_tensors(i)
        assert torch.equal(x, xs) and torch.equal(y, ys) and torch.equal(t, ts)
        assert all(len(b[0]) <= MB for b in batches)


def test_plugin_name_defaults_to_the_regularizer_class():
    assert RegularizerPlugin(L2(1.0)).name == "L2"
    assert RegularizerPlugin(L2(1.0), "l2").name == "l2"


def test_build_regularizer_from_each_spec():
    ewc = build_regularizer(EWCSpec(name="ewc", lam=5.0, mode="online", decay=0.9), 10)
    assert isinstance(ewc, EWC) and (ewc.lam, ewc.mode, ewc.decay) == (5.0, "online", 0.9)
    assert ewc.forward is avalanche_forward_fn
    l2 = build_regularizer(L2Spec(name="l2", eps=0.1, anchor="initial", scope="all"), 10)
    assert isinstance(l2, L2) and (l2.eps, l2.anchor_mode, l2.scope) == (0.1, "initial", "all")
    cl = build_regularizer(CenterLossSpec(name="center_loss", lam=0.2, alpha=0.3), 7)
    assert isinstance(cl, CenterLoss) and (cl.lam, cl.alpha, cl.n_classes) == (0.2, 0.3, 7)
    with pytest.raises(ValueError, match="unknown plugin"):
        build_regularizer(object(), 10)


def test_model_can_be_deep_copied_after_training():
    stream = digits()
    model = mlp(stream)
    strategy = naive(model, [RegularizerPlugin(EWC(1.0, forward=avalanche_forward_fn)), LwFPlugin()])
    train(strategy, stream.train_stream[:1])  # LwFPlugin deep-copies the model after the experience
    copy.deepcopy(model)


# --------------------------------------------------------------------------- composition from the config


def test_replay_plus_center_loss_from_the_config_trains():
    cfg = validate_config({
        "model": {"name": "mlp", "hidden": 16}, "training": {"epochs": 1},
        "strategies": [{"name": "replay", "mem_size": 20, "plugins": [{"name": "center_loss"}]}],
    })
    stream = digits()
    model = mlp(stream)
    strategy = build_learner(cfg.strategies[0], model, cfg.training, [], EvaluationPlugin(loggers=[]),
                             stream.n_classes, cfg.seed)
    replay = [p for p in strategy.plugins if isinstance(p, ReplayPlugin)]
    regs = [p for p in strategy.plugins if isinstance(p, RegularizerPlugin)]
    assert len(replay) == 1 and replay[0].mem_size == 20
    assert len(regs) == 1 and isinstance(regs[0].regularizer, CenterLoss) and regs[0].name == "center_loss"
    cl = regs[0].regularizer
    spec = cfg.strategies[0].plugins[0]  # the spec's defaults, whatever they are
    assert (cl.lam, cl.alpha, cl.n_classes) == (spec.lam, spec.alpha, 10)
    train(strategy, stream.train_stream[:2])
    assert strategy.clock.train_exp_counter == 2
    assert len(replay[0].storage_policy.buffer) == 20
    assert cl.seen.tolist() == [True] * 4 + [False] * 6
    assert cl.frozen.tolist() == [True] * 4 + [False] * 6
    assert regs[0].last_penalty > 0


@pytest.mark.parametrize("model", [{}, {"name": "mlp"}, {"name": "cnn"}])
def test_oneprompt_without_a_vit_is_refused(model):
    with pytest.raises(ConfigError) as err:
        validate_config({"model": model, "strategies": [{"name": "oneprompt"}]})
    msg = str(err.value)
    assert "model.name" in msg and "vit" in msg and "oneprompt" in msg


@pytest.mark.parametrize("stream", [{"name": "permuted_digits"}, {"name": "rotated_digits"},
                                    {"name": "split_digits", "scenario": "task"}])
def test_oneprompt_on_a_domain_or_task_stream_is_refused(stream):
    with pytest.raises(ConfigError, match="class-incremental"):
        validate_config({"stream": stream, "model": {"name": "vit"}, "strategies": [{"name": "oneprompt"}]})


def test_oneprompt_with_a_vit_on_a_class_stream_is_accepted():
    cfg = validate_config({"model": {"name": "vit"}, "strategies": [{"name": "oneprompt"}]})
    assert isinstance(cfg.strategies[0], OnePromptSpec)


def test_center_loss_on_a_task_stream_is_refused_by_the_config():
    with pytest.raises(ConfigError, match="center_loss"):
        validate_config({"stream": {"scenario": "task"}, "model": {"name": "mlp"},
                         "strategies": [{"name": "naive", "plugins": [{"name": "center_loss"}]}]})


# --------------------------------------------------------------------------- OnePrompt


def test_oneprompt_trains_prompt_and_head_only_and_never_predicts_unseen_classes():
    stream = digits()
    RNGManager.set_random_seeds(0)
    model = build_model(ModelConfig(name="vit", vit_dim=16, vit_depth=2, vit_heads=2), stream.input_shape,
                        stream.n_classes, multi_head=False)
    backbone = {k: v.detach().clone() for k, v in model.backbone.state_dict().items()}
    spec = OnePromptSpec(name="oneprompt", vor=True, vor_epochs=1, outliers_per_class=5)
    strategy = build_learner(spec, model, TrainingConfig(epochs=1), [], EvaluationPlugin(loggers=[]),
                             stream.n_classes, seed=0)
    oneprompt = strategy.plugins[0]
    x_all = torch.cat([stream.test_tensors(i)[0] for i in range(stream.n_experiences)])
    seen = set()
    for i in range(2):
        prompt = {k: v.detach().clone() for k, v in model.prompt.state_dict().items()}
        head = {k: v.detach().clone() for k, v in model.head.state_dict().items()}
        train(strategy, [stream.train_stream[i]])
        seen |= set(stream.classes_per_experience[i])
        for k, v in model.backbone.state_dict().items():
            assert torch.equal(v, backbone[k]), f"backbone {k} changed"
        assert all(not p.requires_grad for p in model.backbone.parameters())
        assert all(not torch.equal(v, prompt[k]) for k, v in model.prompt.state_dict().items())
        assert all(not torch.equal(v, head[k]) for k, v in model.head.state_dict().items())
        assert oneprompt.last_vor["n_outliers"] == 5 * 2
        model.eval()
        with torch.no_grad():
            pred = model(x_all).argmax(1)
        assert set(pred.unique().tolist()) <= seen == set(range(2 * (i + 1)))
        assert model.active.tolist() == [c in seen for c in range(10)]
