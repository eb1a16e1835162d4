"""tasks/vit.py: small ViT with OnePrompt prefix-tuning (prompts on keys/values, frozen backbone)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lifelong.tasks.vit import PrefixAttention, PromptedViT

SHAPE = (1, 8, 8)


def make(**kw) -> PromptedViT:
    torch.manual_seed(0)
    return PromptedViT(SHAPE, n_classes=4, **kw)


def batch(n: int = 6):
    g = torch.Generator().manual_seed(1)
    return torch.rand(n, *SHAPE, generator=g), torch.randint(0, 4, (n,), generator=g)


def test_shapes_and_layout():
    model = make()
    x, _ = batch()
    assert model(x).shape == (6, 4)
    assert model.features(x).shape == (6, 64) and model.feature_dim == 64
    assert model.use_prompt is False
    # general 4 tokens (2 keys + 2 values) in layers 0-1, expert 8 (4 + 4) in layers 2-4
    for layer, n_keys in [(0, 2), (1, 2), (2, 4), (3, 4), (4, 4)]:
        keys, values = model.prompt.prefix(layer)
        assert keys.shape == values.shape == (n_keys, 64)
    prompt_ids = {id(p) for p in model.prompt.parameters()}
    assert prompt_ids.isdisjoint(id(p) for p in model.backbone.parameters())
    assert all(0 <= p.min() and p.max() <= 1 for p in model.prompt.parameters())  # uniform(0, 1)


def test_invalid_layout_is_rejected():
    with pytest.raises(ValueError, match="even"):
        make(general_len=3)
    with pytest.raises(ValueError, match="outside"):
        make(expert_layers=(5,))
    with pytest.raises(ValueError, match="divisible"):
        PromptedViT((1, 7, 7), 4)


def test_prompt_changes_output_but_not_sequence_length():
    model = make()
    x, _ = batch()
    plain_tokens, plain_out = model.tokens(x), model(x)
    model.use_prompt = True
    # queries come only from the 1 + 16 input tokens: the sequence length is unchanged
    assert model.tokens(x).shape == plain_tokens.shape == (6, 17, 64)
    assert not torch.allclose(model(x), plain_out)


def test_prefix_attention_is_exact_prefix_tuning():
    torch.manual_seed(0)
    attn = PrefixAttention(16, heads=4)
    x, z = torch.randn(2, 5, 16), torch.randn(2, 3, 16)
    # prefixing keys/values with k(z), v(z) equals attending over [z, x] and reading x's positions
    joint = attn(torch.cat([z, x], dim=1))[:, 3:]
    prefixed = torch.stack([attn(x[i:i + 1], (attn.k(z[i]), attn.v(z[i])))[0] for i in range(2)])
    assert prefixed.shape == x.shape
    assert torch.allclose(prefixed, joint, atol=1e-5)


def test_frozen_backbone_only_prompt_and_head_train():
    model = make()
    model.use_prompt = True
    model.freeze_backbone()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert {id(p) for p in trainable} == {id(p) for p in [*model.prompt.parameters(), *model.head.parameters()]}
    opt = torch.optim.Adam(trainable, lr=1e-2)
    x, y = batch()
    for _ in range(3):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    for name, p in model.named_parameters():
        if name.startswith("backbone."):
            assert torch.equal(p, before[name]), name
            assert p.grad is None, name
        else:
            assert not torch.equal(p, before[name]), name


def test_pretraining_without_prompt_trains_backbone_and_head():
    model = make()
    x, y = batch()
    F.cross_entropy(model(x), y).backward()
    for name, p in model.named_parameters():
        if name.startswith("prompt."):
            assert p.grad is None, name  # the prompt is not used in pre-training
        else:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
