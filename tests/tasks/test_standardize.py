"""tasks/standardize.py: per-channel statistics of the training split, applied as the first layer."""

import numpy as np
import pytest
import torch

from lifelong.config import ModelConfig, StreamConfig
from lifelong.tasks.models import build_model
from lifelong.tasks.standardize import MIN_STD, Standardize, channel_stats
from lifelong.tasks.streams import build_stream


def test_channel_stats_match_numpy_per_channel():
    x = torch.rand(50, 3, 4, 5) * torch.tensor([1.0, 2.0, 0.5]).view(1, 3, 1, 1) + torch.tensor([0, 1, 2]).view(1, 3, 1, 1)
    mean, std = channel_stats(x)
    ref = x.numpy().transpose(1, 0, 2, 3).reshape(3, -1)
    assert np.allclose(mean.numpy(), ref.mean(1), atol=1e-6)
    assert np.allclose(std.numpy(), ref.std(1, ddof=1), atol=1e-6)


def test_flat_features_get_one_statistic_each_and_constants_are_only_centred():
    x = torch.cat([torch.randn(40, 2), torch.full((40, 1), 7.0)], 1)
    mean, std = channel_stats(x)
    assert mean.shape == (3,) and std[2] == MIN_STD and mean[2] == pytest.approx(7.0)
    out = Standardize((3,), (mean, std))(x)
    assert torch.allclose(out[:, 2], torch.zeros(40))


def test_the_layer_standardises_and_is_identity_without_statistics():
    x = torch.rand(6, 2, 3, 3)
    stats = (torch.tensor([0.5, 0.2]), torch.tensor([0.25, 2.0]))
    out = Standardize((2, 3, 3), stats)(x)
    assert torch.allclose(out[:, 0], (x[:, 0] - 0.5) / 0.25) and torch.allclose(out[:, 1], (x[:, 1] - 0.2) / 2.0)
    assert torch.equal(Standardize((2, 3, 3))(x), x)
    layer = Standardize((2, 3, 3), stats)
    assert not list(layer.parameters()) and {"mean", "std"} <= set(layer.state_dict())  # buffers travel with it


def test_a_stream_records_its_training_split_statistics_and_models_carry_them():
    stream = build_stream(StreamConfig(name="split_digits"), 0)
    x = torch.cat([stream.train_tensors(i)[0] for i in range(stream.n_experiences)])
    mean, std = stream.input_stats
    assert mean.item() == pytest.approx(float(x.mean()), abs=1e-5)  # the training split, not the test split
    assert std.item() == pytest.approx(float(x.std()), abs=1e-5)
    model = build_model(ModelConfig(), stream.input_shape, 10, multi_head=False, input_stats=stream.input_stats)
    assert model.state_dict()["backbone.0.mean"].flatten().tolist() == pytest.approx([mean.item()])
    off = build_model(ModelConfig(standardize_input=False), stream.input_shape, 10, multi_head=False,
                      input_stats=stream.input_stats)
    assert off.state_dict()["backbone.0.mean"].flatten().tolist() == [0.0]
