"""The one interface of every loss-side continual-learning method, and its Avalanche adapter.

A ``Regularizer`` is plain PyTorch: it adds a penalty to the task loss, consolidates what it
needs after each experience (Fisher, anchors, centers) and keeps that in a ``state_dict`` so a
federated client can persist it between rounds. ``RegularizerPlugin`` plugs any of them into an
Avalanche strategy, the way Avalanche's own ``LwFPlugin`` wraps its regulariser.
"""

from __future__ import annotations

from typing import Callable, Iterable, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

#: How a regulariser calls the model: ``forward(model, x, task_labels) -> logits``.
Forward = Callable[[nn.Module, Tensor, Tensor], Tensor]
#: What ``after_experience`` reads: mini-batches ``(x, y, task_labels)`` of the finished experience.
Batches = Iterable[tuple[Tensor, Tensor, Tensor]]


def plain_forward(model: nn.Module, x: Tensor, t: Tensor) -> Tensor:
    return model(x)


@runtime_checkable
class Regularizer(Protocol):
    def penalty(self, model: nn.Module, x: Tensor, y: Tensor, out: Tensor,
                features: Tensor | None = None) -> Tensor:
        """Added to the loss before backward. ``features`` is the head's input (penultimate)."""
        ...

    def before_experience(self, model: nn.Module, classes: list[int]) -> None:
        """Called before training on an experience with its classes."""
        ...

    def after_experience(self, model: nn.Module, batches: Batches) -> None:
        """Consolidate after an experience (Fisher, anchors, centers)."""
        ...

    def state_dict(self) -> dict[str, Tensor]: ...

    def load_state_dict(self, state: dict[str, Tensor]) -> None: ...


def unwrap_name(name: str) -> str:
    """Parameter names without wrapper prefixes (Opacus' ``_module.``), so state lines up."""
    while name.startswith("_module."):
        name = name[len("_module."):]
    return name


def named_params(model: nn.Module, exclude_head: bool = False) -> dict[str, nn.Parameter]:
    """Trainable parameters by unwrapped name, optionally without the classifier head."""
    out = {}
    for name, p in model.named_parameters():
        name = unwrap_name(name)
        if exclude_head and name.startswith("head."):
            continue
        out[name] = p
    return out


def pack(prefix: str, tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    return {f"{prefix}/{k}": v for k, v in tensors.items()}


def unpack(prefix: str, state: dict[str, Tensor]) -> dict[str, Tensor]:
    head = f"{prefix}/"
    return {k[len(head):]: v for k, v in state.items() if k.startswith(head)}


def penalty_sum(terms: Iterable[Tensor], like: Tensor) -> Tensor:
    total = torch.zeros((), device=like.device, dtype=like.dtype)
    for t in terms:
        total = total + t
    return total
