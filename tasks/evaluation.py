"""Evaluating a learner on the experiences of a stream, fast enough to do every few iterations.

Test splits are read into tensors once (``Stream.test_tensors``) and evaluated in large
batches, instead of Avalanche's ``eval()`` loop, whose per-sample data path and callbacks would
cost more than training at an evaluation every 10 iterations. ``ContinualEvalPlugin`` is the
thin Avalanche adapter that takes those evaluations during training.
"""

from __future__ import annotations

from typing import Callable

import torch
from avalanche.core import SupervisedPlugin
from avalanche.models.utils import avalanche_forward

from lifelong.tasks.metrics import ContinualTrace
from lifelong.tasks.streams import Stream


@torch.no_grad()
def correct_predictions(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, t: torch.Tensor,
                        batch_size: int = 1024, device: str | torch.device = "cpu") -> torch.Tensor:
    """Whether ``model`` classifies each sample of (x, y) (task labels t) right, as a bool tensor
    on the CPU; restores the model's mode."""
    was_training = model.training
    model.eval()
    hits = []
    for i in range(0, len(x), batch_size):
        xb, yb, tb = (a[i : i + batch_size].to(device) for a in (x, y, t))
        hits.append((avalanche_forward(model, xb, tb).argmax(1) == yb).cpu())
    model.train(was_training)
    return torch.cat(hits) if hits else torch.zeros(0, dtype=torch.bool)


def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, t: torch.Tensor,
             batch_size: int = 1024, device: str | torch.device = "cpu") -> float:
    """Top-1 accuracy of ``model`` on (x, y) with task labels t; restores the model's mode."""
    return int(correct_predictions(model, x, y, t, batch_size, device).sum()) / max(1, len(x))


def evaluate(model: torch.nn.Module, stream: Stream, experiences, batch_size: int = 1024,
             device: str | torch.device = "cpu") -> dict[int, float]:
    """Accuracy on each of the given experience indices."""
    return {i: accuracy(model, *stream.test_tensors(i), batch_size=batch_size, device=device)
            for i in experiences}


def evaluated_experiences(stream: Stream, trained: int) -> range:
    """The experiences a model that has trained on experiences 0..``trained`` is evaluated on.

    Every one, except on a task stream: a multi-head model's heads of later tasks are untrained
    (in the continual flow they do not exist yet), so those accuracy-matrix cells are NaN.
    """
    return range(trained + 1 if stream.scenario == "task" else stream.n_experiences)


class ContinualEvalPlugin(SupervisedPlugin):
    """Every ``every`` training iterations, evaluate on the experiences seen so far.

    Also evaluates just before the first update of each experience and after its last, as
    continual evaluation requires. Only seen experiences are evaluated: unseen ones would
    corrupt min-ACC. ``on_point(iteration, experience, accuracies)`` receives each evaluation.
    """

    checkpoint_stateless = True  # nothing of its own to checkpoint (bridges/avalanche/checkpoint.py)

    def __init__(self, stream: Stream, every: int, trace: ContinualTrace, batch_size: int = 1024,
                 on_point: Callable[[int, int, dict[int, float]], None] | None = None,
                 experience_index: Callable[[object], int] | None = None):
        super().__init__()
        self.stream, self.every, self.trace = stream, every, trace
        self.batch_size, self.on_point = batch_size, on_point
        # Joint training sees one experience made of all; the flow tells which index it stands for.
        self.experience_index = experience_index or (lambda s: s.experience.current_experience)
        self._last_point = (-1, -1)

    def _evaluate(self, strategy, it: int) -> None:
        """``it``: updates completed so far (the point's step)."""
        current = self.experience_index(strategy)
        if (it, current) == self._last_point:
            return
        accs = evaluate(strategy.model, self.stream, range(current + 1), self.batch_size, strategy.device)
        self.trace.add(it, current, accs)
        self._last_point = (it, current)
        if self.on_point is not None:
            self.on_point(it, current, accs)

    # Avalanche's clock is the last plugin: during ``after_training_iteration`` it has not yet
    # counted the update that just happened, so that point is ``train_iterations + 1``.
    def before_training_exp(self, strategy, **kwargs):
        self._evaluate(strategy, strategy.clock.train_iterations)

    def after_training_iteration(self, strategy, **kwargs):
        done = strategy.clock.train_iterations + 1
        if self.every and done % self.every == 0:
            self._evaluate(strategy, done)

    def after_training_exp(self, strategy, **kwargs):
        self._evaluate(strategy, strategy.clock.train_iterations)
