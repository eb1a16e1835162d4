"""Per-task gradients and the combiners that merge them into one update.

A multi-task step computes one flattened gradient per task (``task_gradients``), hands the list to a
``GradientCombiner`` (plain/weighted sum here, PCGrad in ``strategies/combiners/pcgrad.py``, GCond in
``strategies/combiners/gcond.py``) and writes the merged vector back into ``p.grad`` (``write_grad``) so that any
``torch.optim`` optimizer can apply it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Protocol

import torch
from torch import Tensor


class GradientCombiner(Protocol):
    def combine(self, grads: Sequence[Tensor]) -> Tensor:
        """Per-task flattened gradients (all the same length) -> one flattened gradient."""
        ...


class WeightedSum:
    """``sum_i w_i g_i``; ``weights=None`` is the plain sum (what ``sum(losses).backward()`` gives)."""

    def __init__(self, weights: Sequence[float] | None = None):
        self.weights = None if weights is None else [float(w) for w in weights]

    def combine(self, grads: Sequence[Tensor]) -> Tensor:
        g = torch.stack(list(grads))
        if self.weights is None:
            return g.sum(0)
        if len(self.weights) != g.shape[0]:
            raise ValueError(f"WeightedSum has {len(self.weights)} weights for {g.shape[0]} gradients")
        w = torch.tensor(self.weights, dtype=g.dtype, device=g.device)
        return (w[:, None] * g).sum(0)


def _params(params: Iterable[Tensor]) -> list[Tensor]:
    return list(params)  # callers often pass a generator (model.parameters()); we iterate it twice


def flat_grad(params: Iterable[Tensor]) -> Tensor:
    """The parameters' ``.grad`` as one vector; a missing grad counts as zeros so offsets stay aligned."""
    params = _params(params)
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])


def write_grad(params: Iterable[Tensor], flat: Tensor) -> None:
    """Write a flattened vector into ``p.grad`` (replacing it), in each parameter's shape and dtype."""
    params = _params(params)
    total = sum(p.numel() for p in params)
    if flat.numel() != total:
        raise ValueError(f"flat gradient has {flat.numel()} entries, parameters have {total}")
    offset = 0
    for p in params:
        n = p.numel()
        # clone: p.grad must not alias the combiner's buffers (optimizers may modify grads in place)
        p.grad = flat[offset : offset + n].detach().view_as(p).to(p.dtype).clone()
        offset += n


def task_gradients(model_params: Iterable[Tensor], losses: Sequence[Tensor]) -> list[Tensor]:
    """One backward pass per loss, each returned as a flattened gradient over ``model_params``.

    ``torch.autograd.grad`` (not ``.backward()``) so the per-task gradients never mix in ``p.grad``;
    ``retain_graph`` because the losses usually share one forward graph. A parameter a loss does not
    reach (e.g. another task's head) gets zeros.
    """
    params = _params(model_params)
    out = []
    for loss in losses:
        grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
        out.append(
            torch.cat(
                [(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(grads, params)]
            )
        )
    return out
