"""tasks/models.py: build_model for the MLP and the CNN, single- and multi-head."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from avalanche.models import MultiHeadClassifier
from avalanche.models.dynamic_modules import avalanche_model_adaptation
from avalanche.models.utils import avalanche_forward, is_multi_task_module
from torch import nn

from lifelong.config import ModelConfig
from lifelong.tasks.models import build_model

HIDDEN = 32


def small(name: str) -> ModelConfig:
    return ModelConfig(name=name, hidden=HIDDEN, channels=(4, 8))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_single_head_on_digits(name):
    model = build_model(small(name), (1, 8, 8), 10, multi_head=False)
    x = torch.rand(5, 1, 8, 8)
    assert model(x).shape == (5, 10)
    assert model.features(x).shape == (5, HIDDEN)
    assert isinstance(model.head, nn.Linear)
    assert (model.head.in_features, model.head.out_features) == (HIDDEN, 10)
    assert not is_multi_task_module(model)
    # forward is head(features)
    model.eval()
    assert torch.allclose(model(x), model.head(model.features(x)))


def test_default_model_config_is_cnn_with_256_features():
    model = build_model(ModelConfig(), (1, 8, 8), 10, multi_head=False)
    x = torch.rand(2, 1, 8, 8)
    assert model(x).shape == (2, 10)
    assert model.features(x).shape == (2, 256)


def test_cnn_on_cifar_sized_images():
    model = build_model(small("cnn"), (3, 32, 32), 10, multi_head=False)
    x = torch.rand(5, 3, 32, 32)
    assert model(x).shape == (5, 10)
    assert model.features(x).shape == (5, HIDDEN)


def test_mlp_on_flat_features():
    model = build_model(small("mlp"), (64,), 4, multi_head=False)
    assert model(torch.rand(5, 64)).shape == (5, 4)


def test_cnn_on_flat_input_is_refused():
    with pytest.raises(ValueError, match=r"model.name='cnn' needs image input \(C×H×W\)") as info:
        build_model(small("cnn"), (64,), 10, multi_head=False)
    assert "(64,)" in str(info.value) and "'mlp'" in str(info.value)


def test_unknown_model_name_is_refused():
    cfg = ModelConfig.model_construct(name="resnet", hidden=8, channels=(4, 8), dropout=0.0)  # bypasses validation
    with pytest.raises(ValueError, match="unknown model 'resnet'"):
        build_model(cfg, (1, 8, 8), 10, multi_head=False)


def test_dropout_is_in_the_backbone():
    cfg = ModelConfig(name="mlp", hidden=HIDDEN, dropout=0.5)
    model = build_model(cfg, (1, 8, 8), 10, multi_head=False)
    assert any(isinstance(m, nn.Dropout) and m.p == 0.5 for m in model.backbone.modules())


def _task_experience(task: int, classes: list[int]) -> SimpleNamespace:
    """What Avalanche's model adaptation reads from a task-incremental experience."""
    return SimpleNamespace(classes_in_this_experience=classes, task_labels=[task], task_label=task,
                           current_experience=task)


@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_multi_head_needs_task_labels(name):
    model = build_model(small(name), (1, 8, 8), 10, multi_head=True)
    assert is_multi_task_module(model)
    assert isinstance(model.head, MultiHeadClassifier)
    # strategies adapt the model to each experience before training on it: one head per task
    for task in range(2):
        avalanche_model_adaptation(model, _task_experience(task, [2 * task, 2 * task + 1]))
    assert sorted(model.head.classifiers.keys()) == ["0", "1"]
    x = torch.rand(5, 1, 8, 8)
    t = torch.tensor([0, 1, 0, 1, 1])
    out = avalanche_forward(model, x, t)
    # outputs span the classes seen so far (0..3); each sample's head only fills its task's classes
    assert out.shape == (5, 4)
    assert model.features(x).shape == (5, HIDDEN)
    # the task label picks the head: the same input gives different outputs under tasks 0 and 1
    model.eval()
    out0 = avalanche_forward(model, x, torch.zeros(5, dtype=torch.long))
    out1 = avalanche_forward(model, x, torch.ones(5, dtype=torch.long))
    assert not torch.allclose(out0, out1)
    # task 1's head only scores classes 2 and 3: classes 0 and 1 are masked
    assert (out1[:, :2] == model.head.mask_value).all()
    assert (out1[:, 2:] != model.head.mask_value).all()
    with pytest.raises(TypeError):
        model(x)  # no task labels: refused


def test_multi_head_output_masks_everything_but_the_tasks_own_classes():
    """Avalanche pads a narrower head's output with zeros; they are masked here, so a task's
    loss and argmax see only its own classes (whatever heads the model already has)."""
    model = build_model(small("mlp"), (1, 8, 8), 10, multi_head=True)
    for task, classes in [(0, [0, 1]), (1, [4, 5])]:
        avalanche_model_adaptation(model, _task_experience(task, classes))
    model.eval()  # (no dropout: the last line compares two forward passes)
    x, t = torch.rand(4, 1, 8, 8), torch.tensor([0, 1, 0, 1])
    out = avalanche_forward(model, x, t)
    assert out.shape == (4, 6)
    masked = out == model.head.mask_value
    assert masked[t == 0].tolist() == [[False, False, True, True, True, True]] * 2  # head 0: 2 columns
    assert masked[t == 1].tolist() == [[True, True, True, True, False, False]] * 2
    assert torch.allclose(model(x[:1], 0), out[:1])  # a single task label: the same columns


@pytest.mark.parametrize(("side", "stages"), [(8, 1), (28, 3), (32, 3), (64, 4), (4, 0)])
def test_conv_stages_bring_every_image_size_down_to_four_pixels(side, stages):
    from lifelong.tasks.models import conv_stages

    assert conv_stages(side) == stages


@pytest.mark.parametrize(("shape", "pools"), [((1, 8, 8), 1), ((1, 28, 28), 3), ((3, 32, 32), 3)])
def test_cnn_scales_with_the_input_and_ends_in_linear_normalised_features(shape, pools):
    model = build_model(ModelConfig(channels=(8, 16)), shape, 10, multi_head=False)
    layers = list(model.backbone)
    assert sum(isinstance(m, nn.MaxPool2d) for m in layers) == pools
    assert sum(isinstance(m, nn.GroupNorm) for m in layers) == pools
    widths = [m.out_channels for m in layers if isinstance(m, nn.Conv2d)]
    assert widths == [8, 16, 16][:pools]  # the last width repeats
    # the head reads Linear → LayerNorm features: no ReLU there to die
    assert [type(m) for m in layers[-3:]] == [nn.Linear, nn.LayerNorm, nn.Dropout]
    features = model.features(torch.rand(4, *shape))
    assert features.shape == (4, 256) and (features < 0).any()
