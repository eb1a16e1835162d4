"""Elastic Weight Consolidation.

Kirkpatrick et al., "Overcoming catastrophic forgetting in neural networks", PNAS 2017; as
studied in Smith et al., "A Closer Look at Rehearsal-Free Continual Learning", CVPR-W 2023
(arXiv 2203.17269). Penalty ``lambda * sum_k sum_i F_k,i (theta_i - theta*_k,i)^2`` with the
diagonal empirical Fisher ``F`` = mean over the finished experience's mini-batches of the squared
gradient of the loss — the definition Avalanche's ``EWCPlugin`` uses (``training/plugins/ewc.py``),
against which tests check the value.

Modes: ``separate`` keeps one (F_k, theta*_k) per past experience (Avalanche's default);
``online`` keeps one running Fisher ``F <- decay * F + F_new`` anchored at the latest parameters
(Smith et al.'s research code accumulates without decay: ``decay = 1``).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from lifelong.strategies.regularizers.base import (
    Batches,
    Forward,
    named_params,
    pack,
    penalty_sum,
    plain_forward,
    unpack,
)


def empirical_fisher(model: nn.Module, batches: Batches, forward: Forward = plain_forward) -> dict[str, Tensor]:
    """Diagonal empirical Fisher: mean over mini-batches of squared batch-loss gradients."""
    params = named_params(model)
    fisher = {k: torch.zeros_like(p) for k, p in params.items()}
    was_training = model.training
    model.eval()
    n = 0
    for x, y, t in batches:
        model.zero_grad()
        nn.functional.cross_entropy(forward(model, x, t), y).backward()
        for k, p in params.items():
            if p.grad is not None:
                fisher[k] += p.grad.detach() ** 2
        n += 1
    model.zero_grad()
    model.train(was_training)
    return {k: f / max(1, n) for k, f in fisher.items()}


class EWC:
    def __init__(self, lam: float, mode: Literal["separate", "online"] = "separate", decay: float = 1.0,
                 forward: Forward = plain_forward):
        if lam < 0:
            raise ValueError(f"ewc lambda must be >= 0, got {lam}")
        self.lam, self.mode, self.decay, self.forward = lam, mode, decay, forward
        self.fishers: list[dict[str, Tensor]] = []
        self.anchors: list[dict[str, Tensor]] = []

    def penalty(self, model, x, y, out, features=None) -> Tensor:
        params = named_params(model)
        terms = [
            (f[k] * (params[k] - a[k]) ** 2).sum()
            for f, a in zip(self.fishers, self.anchors) for k in f if k in params
        ]
        return self.lam * penalty_sum(terms, out)

    def before_experience(self, model, classes) -> None:
        pass

    def after_experience(self, model, batches) -> None:
        fisher = empirical_fisher(model, batches, self.forward)
        anchor = {k: p.detach().clone() for k, p in named_params(model).items()}
        if self.mode == "online" and self.fishers:
            old = self.fishers[0]  # parameters new since (a new task's head) start from zero
            fisher = {k: (self.decay * old[k] if k in old and old[k].shape == f.shape else 0) + f
                      for k, f in fisher.items()}
            self.fishers, self.anchors = [fisher], [anchor]
        else:
            self.fishers.append(fisher)
            self.anchors.append(anchor)

    def state_dict(self) -> dict[str, Tensor]:
        state: dict[str, Tensor] = {"count": torch.tensor(len(self.fishers))}
        for i, (f, a) in enumerate(zip(self.fishers, self.anchors)):
            state.update(pack(f"fisher{i}", f))
            state.update(pack(f"anchor{i}", a))
        return state

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        n = int(state["count"])
        self.fishers = [unpack(f"fisher{i}", state) for i in range(n)]
        self.anchors = [unpack(f"anchor{i}", state) for i in range(n)]
