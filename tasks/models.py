"""Models sized for small images: an MLP and a small CNN, each a backbone plus a classifier head.

Every model exposes ``features(x)`` (the penultimate representation: center loss and
feature-space methods read it) and ``head`` (parameter regularisers exclude it), so later
families (a small ViT for prompting) plug in behind the same two names.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from avalanche.models import MultiHeadClassifier, MultiTaskModule
from avalanche.models.dynamic_modules import avalanche_model_adaptation
from torch import nn

from lifelong.config import ModelConfig
from lifelong.tasks.standardize import Standardize

if TYPE_CHECKING:
    from lifelong.tasks.streams import Stream


def feature_layer(in_features: int, hidden: int, dropout: float) -> list[nn.Module]:
    """The features the head reads: linear, then LayerNorm — no ReLU.

    A ReLU here died: in a class-incremental stream the new classes' loss pushes the shared
    features of the old ones below zero, and on the 28×28 digits 86-98% of 256 ReLU features never
    fired again — the model then predicted one class of the experience it had just trained on
    (0.49 on two classes). Linear + LayerNorm features cannot die, and keep one scale across
    experiences for the head and for feature-space methods (center loss).
    """
    return [nn.Linear(in_features, hidden), nn.LayerNorm(hidden), nn.Dropout(dropout)]


def mlp_backbone(input_shape: tuple[int, ...], hidden: int, dropout: float,
                 stats: tuple[torch.Tensor, torch.Tensor] | None = None) -> nn.Sequential:
    return nn.Sequential(
        Standardize(input_shape, stats), nn.Flatten(),
        nn.Linear(math.prod(input_shape), hidden), nn.ReLU(), nn.Dropout(dropout),
        *feature_layer(hidden, hidden, dropout),
    )


def conv_stages(side: int) -> int:
    """How many 2× poolings bring an image side down to 4 pixels or fewer (8 → 1, 28 → 3, 32 → 3)."""
    stages = 0
    while side > 4:
        side //= 2
        stages += 1
    return stages


def cnn_backbone(input_shape: tuple[int, ...], channels: tuple[int, ...], hidden: int, dropout: float,
                 stats: tuple[torch.Tensor, torch.Tensor] | None = None) -> nn.Sequential:
    """Convolution stages scaled to the image: each is conv 3×3 → GroupNorm → ReLU → max-pool 2×,
    repeated until the map is 4×4 or smaller, so every image size ends in the same few pixels
    (the old fixed two convolutions at full resolution pooled a 28×28 image's 5×5-pixel features
    to 4×4, and cost 5× more). ``channels[i]`` is stage i's width (the last one repeats).
    GroupNorm, not BatchNorm: it keeps no running statistics to drift between experiences or
    between federated clients, and Opacus' per-sample gradients support it."""
    if len(input_shape) != 3:
        raise ValueError(f"model.name='cnn' needs image input (C×H×W), the stream gives {input_shape}; use 'mlp'")
    layers: list[nn.Module] = [Standardize(input_shape, stats)]
    c, side = input_shape[0], min(input_shape[1:])
    height, width = input_shape[1:]
    for i in range(max(1, conv_stages(side))):
        out = channels[min(i, len(channels) - 1)]
        layers += [nn.Conv2d(c, out, 3, padding=1), nn.GroupNorm(math.gcd(8, out), out), nn.ReLU(), nn.MaxPool2d(2)]
        c, height, width = out, height // 2, width // 2
    return nn.Sequential(*layers, nn.Flatten(), *feature_layer(c * height * width, hidden, dropout))


class Classifier(nn.Module):
    """backbone → features → head (one output per class): class- and domain-incremental."""

    def __init__(self, backbone: nn.Module, feature_dim: int, n_classes: int):
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(feature_dim, n_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


class MaskedMultiHeadClassifier(MultiHeadClassifier):
    """Avalanche's multi-head classifier, with each task's output masked over every class column.

    A batch's output spans every class seen (``max_class_label``). Avalanche masks the other
    tasks' classes inside a head (``mask_value``) but pads a narrower head's output with zeros,
    unmasked, so that task competes with zero logits in the loss and the argmax: a model with
    every head from the start, as a federated run's (``build_stream_model``), stayed at chance
    on 2-class Split-Digits tasks after a round (measured). Here the padding is masked too:
    only the task's own classes count, as task-incremental prediction means. Same parameters and
    buffers as Avalanche's; the mask is applied out of place (Avalanche writes it into the
    layer's output in place, which autograd refuses when hooks wrap that output, as Opacus' do).
    """

    def forward_single_task(self, x: torch.Tensor, task_label: int) -> torch.Tensor:
        logits = self.classifiers[str(task_label)](x)
        width = max(self.max_class_label, logits.shape[-1])
        mask = getattr(self, f"active_units_T{task_label}")  # the task's classes (set by adaptation)
        active = torch.zeros(width, dtype=torch.bool, device=logits.device)
        active[: len(mask)] = mask.bool()
        return nn.functional.pad(logits, (0, width - logits.shape[-1])).masked_fill(~active, self.mask_value)


class MultiHeadNet(MultiTaskModule):
    """backbone → features → one head per task (Avalanche's MultiHeadClassifier, its padding
    masked: :class:`MaskedMultiHeadClassifier`): task-incremental."""

    def __init__(self, backbone: nn.Module, feature_dim: int):
        super().__init__()
        self.backbone = backbone
        self.head = MaskedMultiHeadClassifier(feature_dim)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)

    def forward_single_task(self, x: torch.Tensor, task_label: int) -> torch.Tensor:
        return self.head(self.backbone(x), task_label)


def build_model(cfg: ModelConfig, input_shape: tuple[int, ...], n_classes: int, multi_head: bool,
                input_stats: tuple[torch.Tensor, torch.Tensor] | None = None) -> nn.Module:
    """The configured network; ``input_stats`` (per-channel mean, std of the training split) set its
    first layer's standardisation — without them (or with ``model.standardize_input = false``) the
    model sees its input as it is."""
    if not cfg.standardize_input:
        input_stats = None
    if cfg.name == "vit":
        if multi_head or len(input_shape) != 3:
            raise ValueError("model.name='vit' needs image input (C×H×W) and a single head (class/domain stream)")
        if input_shape[1] % cfg.vit_patch or input_shape[2] % cfg.vit_patch:
            raise ValueError(f"model.vit_patch: {cfg.vit_patch} does not divide the image size {input_shape[1:]}")
        from lifelong.tasks.vit import PromptedViT

        depth = cfg.vit_depth  # OVOR's layout: general prompt in blocks 0-1, expert prompt in 2-4
        return PromptedViT(input_shape, n_classes, dim=cfg.vit_dim, depth=depth, heads=cfg.vit_heads,
                           input_stats=input_stats, patch=cfg.vit_patch, general_layers=tuple(i for i in (0, 1) if i < depth),
                           expert_layers=tuple(i for i in (2, 3, 4) if i < depth))
    if cfg.name == "mlp":
        backbone = mlp_backbone(input_shape, cfg.hidden, cfg.dropout, input_stats)
    elif cfg.name == "cnn":
        backbone = cnn_backbone(input_shape, cfg.channels, cfg.hidden, cfg.dropout, input_stats)
    else:  # the config only admits known names; this guards direct Python use
        raise ValueError(f"model.name: unknown model {cfg.name!r}; allowed: 'mlp', 'cnn', 'vit'")
    if multi_head:
        return MultiHeadNet(backbone, cfg.hidden)
    return Classifier(backbone, cfg.hidden, n_classes)


def build_stream_model(cfg: ModelConfig, stream: Stream) -> nn.Module:
    """The model for ``stream`` with every head it will ever have, built up front.

    The continual flow lets Avalanche add a task's head when the task arrives. A federated run
    cannot: FedAvg averages the clients' state dicts key by key, and the server and every client
    must hold the same keys in every round, whichever experiences they have seen. The server knows
    the whole stream, so a task stream's multi-head model is adapted here, once, to every training
    experience, in order — one head per task label, sized and masked (``active_units_T<t>``, the
    task's classes) exactly as Avalanche would when that task starts — and Avalanche's own
    adaptation in a client's later rounds then finds nothing to add. Class and domain streams get
    the single-head model unchanged. Draws the new heads' weights from torch's global RNG.
    """
    model = build_model(cfg, stream.input_shape, stream.n_classes, multi_head=stream.scenario == "task",
                        input_stats=stream.input_stats)
    if isinstance(model, MultiTaskModule):
        model.train()  # Avalanche records a task's classes in its mask only in training mode
        for experience in stream.train_stream:
            avalanche_model_adaptation(model, experience)
    return model
