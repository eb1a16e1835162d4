"""PCGrad: project conflicting gradients.

Yu et al., "Gradient Surgery for Multi-Task Learning", NeurIPS 2020 (arXiv 2001.06782), Algorithm 1:
for every task i, start from g_i^PC = g_i and visit the *other* tasks j in a random order; whenever
g_i^PC . g_j < 0, project g_i^PC onto the normal plane of the *original* g_j:

    g_i^PC <- g_i^PC - (g_i^PC . g_j) / ||g_j||^2 * g_j

The update is the sum of the projected gradients.

Compared with LibMTL (median-research-group/LibMTL, LibMTL/weighting/PCGrad.py, read for this file):
- same formula, same use of the original g_j (not g_j^PC), same reduction: ``pc_grads.sum(0)``;
- LibMTL shuffles *all* tasks, i itself included. Projecting g_i^PC on g_i only fires when
  g_i^PC . g_i < 0, impossible with two tasks and rare with more; we follow the paper (j != i);
- LibMTL draws the order from Python's global ``random``; here a ``torch.Generator`` (``seed``) makes
  runs reproducible and ``last_stats["orders"]`` records the orders used.
Reduction: the paper and LibMTL sum; the widely copied Pytorch-PCGrad (WeiChengTseng) defaults to
``reduction="mean"`` (1/N times the sum: same direction, step size divided by N). ``reduction="sum"``
is the default here; ``"mean"`` is offered for comparison with that code.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor


class PCGrad:
    """A ``GradientCombiner``: ``combine(per-task flat grads) -> flat grad``."""

    def __init__(
        self,
        seed: int | None = None,
        generator: torch.Generator | None = None,
        reduction: Literal["sum", "mean"] = "sum",
    ):
        if reduction not in ("sum", "mean"):
            raise ValueError(f"PCGrad reduction must be 'sum' or 'mean', got {reduction!r}")
        if generator is None:
            generator = torch.Generator()
            if seed is not None:
                generator.manual_seed(seed)
            else:
                generator.seed()
        self.generator = generator
        self.reduction = reduction
        self.last_stats: dict = {}

    def project(self, grads: Sequence[Tensor]) -> Tensor:
        """The projected per-task gradients g_i^PC, stacked ``[N, D]`` (inputs are left untouched)."""
        g = torch.stack([t.detach() for t in grads])
        if not g.is_floating_point() or g.dtype in (torch.float16, torch.bfloat16):
            g = g.float()  # dot products of half-precision grads lose too much
        pc = g.clone()
        n = g.shape[0]
        sq_norms = (g * g).sum(1)
        orders, projections = [], 0
        for i in range(n):
            # random order of the other tasks: with >= 3 tasks the result depends on it
            perm = torch.randperm(n, generator=self.generator).tolist()
            order = [j for j in perm if j != i]
            orders.append(order)
            for j in order:
                dot = torch.dot(pc[i], g[j])
                if dot < 0:  # dot < 0 implies ||g_j|| > 0: no division by zero
                    pc[i] -= dot / sq_norms[j] * g[j]
                    projections += 1
        self.last_stats = {"orders": orders, "projections": projections}
        return pc

    def combine(self, grads: Sequence[Tensor]) -> Tensor:
        pc = self.project(grads)
        return pc.sum(0) if self.reduction == "sum" else pc.mean(0)
