"""GCond arbitration inside a continual learner — beyond the GCond paper.

A continual learner also balances two objectives on one set of weights: learning the current
experience, and not forgetting (a regulariser's penalty, or the loss on replayed samples). This
Avalanche plugin treats them as two tasks: before each backward pass it takes the two gradients,
resolves their conflict with GCond's arbitration (``strategies/combiners/gcond.py``: pair selection, smooth
projection; no accumulation and no GCond momentum, the learner's optimizer has its own) and hands
the result to the optimizer through a surrogate loss whose gradient is exactly the arbitrated one.

* ``between="replay"``: cross-entropy on the current samples vs on the replayed ones (Avalanche's
  ReplayDataLoader puts the current experience's samples first in each mini-batch, then
  ``batch_size_mem`` replayed ones); any regulariser penalties ride with the current-task loss.
* ``between="penalty"``: the cross-entropy of the whole batch vs the sum of the regularisers' penalties.
"""

from __future__ import annotations

from typing import Literal

import torch
from avalanche.core import SupervisedPlugin

from lifelong.strategies.combiners.gcond import GCond
from lifelong.strategies.combiners.gradients import task_gradients


class GCondArbitrationPlugin(SupervisedPlugin):
    def __init__(self, between: Literal["replay", "penalty"], batch_size_mem: int | None = None,
                 replay=None, gcond: GCond | None = None):
        super().__init__()
        self.between, self.batch_size_mem, self.replay = between, batch_size_mem, replay
        self.gcond = gcond or GCond()
        self.projections = 0
        self.arbitrated = 0

    # Checkpoints (``bridges/avalanche/checkpoint.py``): GCond's EMA norms, previous gradients and win
    # history carry across steps and experiences; a resumed run must arbitrate as the original did.
    def checkpoint_state(self) -> dict:
        return {"gcond": self.gcond.state_dict(), "projections": self.projections, "arbitrated": self.arbitrated}

    def load_checkpoint_state(self, state: dict, device) -> None:
        self.gcond.load_state_dict(state["gcond"], device)
        self.projections, self.arbitrated = int(state["projections"]), int(state["arbitrated"])

    def _losses(self, strategy) -> list[torch.Tensor] | None:
        out, y = strategy.mb_output, strategy.mb_y
        task = torch.nn.functional.cross_entropy(out, y)
        others = strategy.loss - task  # what the regularisers added before this plugin
        if self.between == "penalty":
            if float(others.detach().abs()) == 0.0:
                return None  # no penalty yet (first experience): nothing to arbitrate
            return [task, others]
        if self.replay is None or len(self.replay.storage_policy.buffer) == 0:
            return None
        # ReplayDataLoader draws min(batch_size_mem, memory size) replayed samples per batch.
        n_mem = min(self.batch_size_mem, len(self.replay.storage_policy.buffer), len(y) - 1)
        current = torch.nn.functional.cross_entropy(out[:-n_mem], y[:-n_mem])
        replayed = torch.nn.functional.cross_entropy(out[-n_mem:], y[-n_mem:])
        return [current + others, replayed]

    def before_backward(self, strategy, **kwargs):
        losses = self._losses(strategy)
        if losses is None:
            return
        params = [p for p in strategy.model.parameters() if p.requires_grad]
        grads = task_gradients(params, losses)
        g = self.gcond.combine(grads)
        self.projections += int(self.gcond.last_stats.get("projections", 0))
        self.arbitrated += 1
        # Surrogate: d/dp sum(p * g_p) = g_p, so the strategy's backward writes the arbitrated
        # gradient into p.grad and its optimizer step applies it.
        offset, surrogate = 0, torch.zeros((), device=g.device)
        for p in params:
            n = p.numel()
            surrogate = surrogate + (p * g[offset : offset + n].view_as(p).detach()).sum()
            offset += n
        strategy.loss = surrogate
