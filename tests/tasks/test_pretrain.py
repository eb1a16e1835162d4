"""Pretraining on data held apart from the stream."""

import torch

from lifelong.config import ModelConfig, PretrainConfig, StreamConfig
from lifelong.tasks.models import build_model
from lifelong.tasks.pretrain import pretrain
from lifelong.tasks.streams import _build_stream_cached, build_stream


def test_holdout_is_taken_out_of_the_stream_stratified():
    _build_stream_cached.cache_clear()
    full = build_stream(StreamConfig(), 0)
    held = build_stream(StreamConfig(holdout_fraction=0.3), 0)
    n_full = sum(len(full.train_tensors(i)[1]) for i in range(5))
    n_stream = sum(len(held.train_tensors(i)[1]) for i in range(5))
    x, y = held.holdout
    assert n_stream + len(y) == n_full
    assert abs(len(y) - 0.3 * n_full) <= 1
    assert torch.unique(y).tolist() == list(range(10))  # every class in the held-apart share
    # the test splits are untouched
    assert torch.equal(full.test_tensors(0)[0], held.test_tensors(0)[0])


def test_pretraining_trains_the_backbone_and_leaves_the_head():
    stream = build_stream(StreamConfig(holdout_fraction=0.3), 0)
    torch.manual_seed(0)
    model = build_model(ModelConfig(name="mlp", hidden=32), stream.input_shape, 10, multi_head=False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    stats = pretrain(model, *stream.holdout, PretrainConfig(epochs=5, lr=0.01), seed=0)
    after = model.state_dict()
    assert stats["pretrain_train_acc"] > 0.8
    assert all(torch.equal(before[k], after[k]) for k in before if k.startswith("head."))
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("backbone."))


def test_pretrained_vit_keeps_its_prompt_untouched():
    stream = build_stream(StreamConfig(holdout_fraction=0.3), 0)
    model = build_model(ModelConfig(name="vit", vit_dim=16, vit_depth=2, vit_heads=2), stream.input_shape, 10,
                        multi_head=False)
    prompt = {k: v.clone() for k, v in model.prompt.state_dict().items()}
    pretrain(model, *stream.holdout, PretrainConfig(epochs=1), seed=0)
    assert all(torch.equal(prompt[k], v) for k, v in model.prompt.state_dict().items())
