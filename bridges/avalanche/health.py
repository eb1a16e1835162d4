"""Avalanche adapter for training health: the gradient norms of an experience's updates.

``tasks/health.py`` probes the model after the experience; this plugin gives it the mean norm
of the gradients the experience's updates used (vanished gradients mean no learning) and
counts non-finite losses.
"""

from __future__ import annotations

import math

import torch
from avalanche.core import SupervisedPlugin


class GradientNormPlugin(SupervisedPlugin):
    """The total gradient norm after every backward pass of the current experience."""

    checkpoint_stateless = True  # restarts with every experience (bridges/avalanche/checkpoint.py)

    def __init__(self):
        super().__init__()
        self.norms: list[float] = []
        self.nonfinite_losses = 0

    def before_training_exp(self, strategy, **kwargs):
        self.norms, self.nonfinite_losses = [], 0

    def after_backward(self, strategy, **kwargs):
        if not bool(torch.isfinite(strategy.loss).all()):
            self.nonfinite_losses += 1
        # (under Opacus the gradients are per sample until the optimiser's step: none here)
        grads = [p.grad.detach() for p in strategy.model.parameters() if p.grad is not None]
        if grads:  # the norm of the per-tensor norms, in one fused call (it runs after every update)
            self.norms.append(float(torch.nn.utils.get_total_norm(grads)))

    @property
    def mean_norm(self) -> float | None:
        """The experience's mean gradient norm (inf after a non-finite loss; None: none seen)."""
        if self.nonfinite_losses:
            return math.inf
        return sum(self.norms) / len(self.norms) if self.norms else None
