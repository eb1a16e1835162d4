"""A small Vision Transformer for small images, with OnePrompt prefix-tuning.

OnePrompt is the prompt of OVOR: Huang et al., "OVOR: OnePrompt with Virtual Outlier
Regularization for Rehearsal-Free Class-Incremental Learning", ICLR 2024 (reference code:
jpmorganchase/ovor). A single prompt, shared by all tasks (no prompt pool, no query/key
matching), is learned on top of a frozen backbone together with the linear head.

Reference files followed:
- ``models/zoo.py`` (``OnePrompt``, ``tensor_prompt``): "general" prompts of length 10 in layers
  0-1 and "expert" prompts of length 40 in layers 2-4; each length counts key and value tokens
  together (first half keys, second half values); ``uniform_(0, 1)`` initialisation.
- ``models/vit.py`` (``Attention.forward``): prefix-tuning. The prompt tokens are concatenated in
  front of the keys and values *after* the k/v projections (they are used as key/value vectors
  directly, not projected), queries are unchanged, so the output sequence length is unchanged.
  Attention is written out here (separate q/k/v projections instead of the reference's fused
  ``qkv``, which is the same map), so that this holds exactly and no timm is needed.
- ``models/zoo.py`` (``ViTZoo.forward``): the feature is the [CLS] token after the final norm.

Deviations: sizes are scaled down for 8×8 images (general 4 = 2+2 tokens, expert 8 = 4+4 tokens
instead of 10 and 40; dim 64, depth 5). Pre-training and the backbone are ours (no timm, no
ImageNet weights): train with ``use_prompt=False``, then ``freeze_backbone()`` and train prompt
and head. If a layer is both general and expert, its prompts are concatenated (expert first, as
the reference's combination code does).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lifelong.tasks.standardize import Standardize

Prefix = tuple[torch.Tensor, torch.Tensor]  # (keys, values), each (P, dim)


class PrefixAttention(nn.Module):
    """Multi-head self-attention whose keys/values can be extended by prefix tokens."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim={dim} must be divisible by heads={heads}")
        self.heads = heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, prefix: Prefix | None = None) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.q(x), self.k(x), self.v(x)
        if prefix is not None:
            # Prompts join keys and values only: every query still comes from the input
            # tokens, so the output has exactly n positions.
            pk, pv = prefix
            k = torch.cat([pk.expand(b, -1, -1), k], dim=1)
            v = torch.cat([pv.expand(b, -1, -1), v], dim=1)

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.reshape(b, t.shape[1], self.heads, c // self.heads).transpose(1, 2)

        out = F.scaled_dot_product_attention(split(q), split(k), split(v))
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class Block(nn.Module):
    """Pre-norm transformer block (as in ViT and the reference)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = PrefixAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor, prefix: Prefix | None = None) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), prefix)
        return x + self.mlp(self.norm2(x))


class ViTBackbone(nn.Module):
    """Patch embedding, [CLS] token, position embedding, blocks and final norm."""

    def __init__(self, input_shape: tuple[int, int, int], dim: int, depth: int, heads: int,
                 patch: int, mlp_ratio: float):
        super().__init__()
        c, h, w = input_shape
        if h % patch or w % patch:
            raise ValueError(f"image {h}×{w} is not divisible into {patch}×{patch} patches")
        self.patch_embed = nn.Conv2d(c, dim, kernel_size=patch, stride=patch)
        n_patches = (h // patch) * (w // patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, n_patches + 1, dim))
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        self.blocks = nn.ModuleList(Block(dim, heads, mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=1e-6)

    def forward(self, x: torch.Tensor, prompt: OnePrompt | None = None) -> torch.Tensor:
        """All tokens after the final norm: (B, 1 + n_patches, dim), [CLS] first."""
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        for i, block in enumerate(self.blocks):
            x = block(x, prompt.prefix(i) if prompt is not None else None)
        return self.norm(x)


class OnePrompt(nn.Module):
    """One prompt per prompted layer, shared by every task; ``prefix(layer)`` → (keys, values)."""

    def __init__(self, dim: int, depth: int, general_len: int, general_layers: tuple[int, ...],
                 expert_len: int, expert_layers: tuple[int, ...]):
        super().__init__()
        self.params = nn.ParameterDict()
        for kind, length, layers in (("e", expert_len, expert_layers), ("g", general_len, general_layers)):
            if length % 2:
                raise ValueError(f"prompt length {length} must be even (half keys, half values)")
            for layer in layers:
                if not 0 <= layer < depth:
                    raise ValueError(f"prompt layer {layer} outside the {depth} blocks")
                # uniform(0, 1) as the reference's tensor_prompt
                self.params[f"{kind}{layer}"] = nn.Parameter(torch.rand(length, dim))

    def prefix(self, layer: int) -> Prefix | None:
        parts = [self.params[name] for name in (f"e{layer}", f"g{layer}") if name in self.params]
        if not parts:
            return None
        keys = torch.cat([p[: len(p) // 2] for p in parts])
        values = torch.cat([p[len(p) // 2:] for p in parts])
        return keys, values


class PromptedViT(nn.Module):
    """backbone → final-norm [CLS] feature → linear head; OnePrompt applied when ``use_prompt``."""

    def __init__(self, input_shape: tuple[int, int, int], n_classes: int, dim: int = 64, depth: int = 5,
                 heads: int = 4, patch: int = 2, mlp_ratio: float = 2, general_len: int = 4,
                 general_layers: tuple[int, ...] = (0, 1), expert_len: int = 8,
                 expert_layers: tuple[int, ...] = (2, 3, 4),
                 input_stats: tuple[torch.Tensor, torch.Tensor] | None = None):
        super().__init__()
        self.standardize = Standardize(tuple(input_shape), input_stats)
        self.backbone = ViTBackbone(tuple(input_shape), dim, depth, heads, patch, mlp_ratio)
        self.prompt = OnePrompt(dim, depth, general_len, tuple(general_layers), expert_len,
                                tuple(expert_layers))
        self.head = nn.Linear(dim, n_classes)
        self.feature_dim = dim
        self.use_prompt = False  # pre-training runs without the prompt
        # Classes the model may predict: a class-incremental learner's head grows as classes
        # arrive (the reference cuts the logits at the last seen class). All active by default.
        self.register_buffer("active", torch.ones(n_classes, dtype=torch.bool))

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(self.standardize(x), self.prompt if self.use_prompt else None)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.tokens(x)[:, 0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.head(self.features(x))
        if bool(self.active.all()):
            return logits
        return logits.masked_fill(~self.active, float("-inf"))

    def freeze_backbone(self) -> None:
        for p in self.backbone.parameters():
            p.requires_grad_(False)
