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

if TYPE_CHECKING:
    from lifelong.tasks.streams import Stream


def mlp_backbone(input_shape: tuple[int, ...], hidden: int, dropout: float) -> nn.Sequential:
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(math.prod(input_shape), hidden), nn.ReLU(), nn.Dropout(dropout),
        nn.Linear(hidden, hidden), nn.ReLU(), nn.Dropout(dropout),
    )


def cnn_backbone(input_shape: tuple[int, ...], channels: tuple[int, int], hidden: int, dropout: float):
    if len(input_shape) != 3:
        raise ValueError(f"model.name='cnn' needs image input (C×H×W), the stream gives {input_shape}; use 'mlp'")
    c1, c2 = channels
    return nn.Sequential(
        nn.Conv2d(input_shape[0], c1, 3, padding=1), nn.ReLU(),
        nn.Conv2d(c1, c2, 3, padding=1), nn.ReLU(),
        nn.MaxPool2d(2),
        # 8×8 inputs are 4×4 here already; larger images are pooled to the same size.
        nn.AdaptiveAvgPool2d(4),
        nn.Flatten(),
        nn.Linear(c2 * 16, hidden), nn.ReLU(), nn.Dropout(dropout),
    )


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


def build_model(cfg: ModelConfig, input_shape: tuple[int, ...], n_classes: int, multi_head: bool) -> nn.Module:
    if cfg.name == "vit":
        if multi_head or len(input_shape) != 3:
            raise ValueError("model.name='vit' needs image input (C×H×W) and a single head (class/domain stream)")
        if input_shape[1] % cfg.vit_patch or input_shape[2] % cfg.vit_patch:
            raise ValueError(f"model.vit_patch: {cfg.vit_patch} does not divide the image size {input_shape[1:]}")
        from lifelong.tasks.vit import PromptedViT

        depth = cfg.vit_depth  # OVOR's layout: general prompt in blocks 0-1, expert prompt in 2-4
        return PromptedViT(input_shape, n_classes, dim=cfg.vit_dim, depth=depth, heads=cfg.vit_heads,
                           patch=cfg.vit_patch, general_layers=tuple(i for i in (0, 1) if i < depth),
                           expert_layers=tuple(i for i in (2, 3, 4) if i < depth))
    if cfg.name == "mlp":
        backbone = mlp_backbone(input_shape, cfg.hidden, cfg.dropout)
    elif cfg.name == "cnn":
        backbone = cnn_backbone(input_shape, cfg.channels, cfg.hidden, cfg.dropout)
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
    model = build_model(cfg, stream.input_shape, stream.n_classes, multi_head=stream.scenario == "task")
    if isinstance(model, MultiTaskModule):
        model.train()  # Avalanche records a task's classes in its mask only in training mode
        for experience in stream.train_stream:
            avalanche_model_adaptation(model, experience)
    return model
