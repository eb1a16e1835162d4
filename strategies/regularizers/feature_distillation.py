"""Feature distillation (FeatKD): keep the penultimate features of the previous model on new data.

As studied in Smith et al., "A Closer Look at Rehearsal-Free Continual Learning", CVPR-W 2023
(arXiv 2203.17269), the third rehearsal-free regulariser beside L2 and EWC: penalty
``mu * mean((f_theta(x) - f_teacher(x))^2)`` over the batch and the feature dimensions, on the
current experience's inputs only (no stored data), with ``f`` the penultimate features (the head's
input) and the teacher a frozen copy of the model at the end of the previous experience. As in a
co-author's research code (summarised in shared/PAPERS.md), the teacher exists from the start:
during the first experience it is the model the learner starts from — the pretrained weights
when there are any — and after each experience it becomes that experience's final model.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from lifelong.strategies.regularizers.base import pack, unpack


class FeatureDistillation:
    def __init__(self, mu: float):
        if mu < 0:
            raise ValueError(f"feature_distillation mu must be >= 0, got {mu}")
        self.mu = mu
        #: The teacher's weights (what is saved and restored); the frozen copy is built from them.
        self.teacher_state: dict[str, Tensor] = {}
        self._teacher: nn.Module | None = None

    def _snapshot(self, model: nn.Module) -> None:
        self.teacher_state = {k: v.detach().clone() for k, v in _unwrapped(model).state_dict().items()}
        self._teacher = None

    def _frozen(self, model: nn.Module) -> nn.Module:
        """The teacher: a copy of ``model``'s architecture holding ``teacher_state``, frozen."""
        if self._teacher is None:
            teacher = _copy_without_hooks(_unwrapped(model))
            teacher.load_state_dict(self.teacher_state)
            self._teacher = teacher.eval().requires_grad_(False)
        return self._teacher

    def penalty(self, model, x, y, out, features=None) -> Tensor:
        if not self.teacher_state or self.mu == 0:
            return torch.zeros((), device=out.device, dtype=out.dtype)
        teacher = self._frozen(model)
        with torch.no_grad():
            target = teacher.features(x)
        current = features if features is not None else _unwrapped(model).features(x)
        return self.mu * ((current - target) ** 2).mean()

    def before_experience(self, model, classes) -> None:
        if not self.teacher_state:  # the first experience: distil toward the starting model
            self._snapshot(model)

    def after_experience(self, model, batches) -> None:
        self._snapshot(model)

    def release(self) -> None:
        """Drop the frozen copy (a federated client's model is reused by the next client)."""
        self._teacher = None

    def state_dict(self) -> dict[str, Tensor]:
        return pack("teacher", self.teacher_state)

    def load_state_dict(self, state) -> None:
        self.teacher_state = unpack("teacher", state)
        self._teacher = None


def _copy_without_hooks(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` whose modules have no hooks: a training framework's hooks (the
    plugin that captures the head's input) would otherwise be copied with whatever they hold —
    a tensor of the current batch's graph, which cannot be deep-copied. The model is untouched:
    each hook table is mapped to an empty one in the copy's memo."""
    memo: dict[int, object] = {}
    for module in model.modules():
        for name, table in vars(module).items():
            if "hooks" in name and isinstance(table, dict):
                memo[id(table)] = type(table)()
    return copy.deepcopy(model, memo)


def _unwrapped(model: nn.Module) -> nn.Module:
    """The model inside Opacus' wrapper, if any (the teacher needs no per-sample gradients)."""
    return getattr(model, "_module", model)
