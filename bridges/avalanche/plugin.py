"""The one Avalanche adapter for every ``Regularizer`` (EWC, L2, center loss, ...).

Avalanche's hooks, in the order they fire: ``before_training_exp`` (experience's classes),
``before_backward`` (add the penalty to ``strategy.loss``), ``after_training_exp`` (consolidate on
the experience's data). The head's input is captured by a forward pre-hook during the training
forward pass, so feature-space regularisers cost no second forward.
"""

from __future__ import annotations

import torch
from avalanche.core import SupervisedPlugin
from avalanche.models.utils import avalanche_forward

from lifelong.strategies.regularizers.base import Regularizer


def avalanche_forward_fn(model, x, t):
    return avalanche_forward(model, x, t)


class RegularizerPlugin(SupervisedPlugin):
    def __init__(self, regularizer: Regularizer, name: str | None = None, consolidate: bool = True):
        super().__init__()
        self.regularizer = regularizer
        #: False for a federated client, which trains an experience over several rounds and
        #: consolidates once, when it first sees the next experience (``clients/learner.py``).
        self.consolidate = consolidate
        self.name = name or type(regularizer).__name__
        self._features: torch.Tensor | None = None
        self._handle = None
        self.last_penalty = 0.0

    def _capture(self, module, args):
        self._features = args[0]

    def before_training_exp(self, strategy, **kwargs):
        head = getattr(strategy.model, "head", None)
        if head is not None and self._handle is None:
            self._handle = head.register_forward_pre_hook(self._capture)
        classes = sorted(int(c) for c in strategy.experience.classes_in_this_experience)
        self.regularizer.before_experience(strategy.model, classes)

    def before_backward(self, strategy, **kwargs):
        penalty = self.regularizer.penalty(strategy.model, strategy.mb_x, strategy.mb_y,
                                           strategy.mb_output, self._features)
        self._features = None  # do not keep the batch's graph alive
        self.last_penalty = float(penalty.detach())
        strategy.loss = strategy.loss + penalty

    def after_update(self, strategy, **kwargs):
        hook = getattr(self.regularizer, "after_update", None)  # optional: center loss uses it
        if hook is not None:
            hook(strategy.model)

    def after_training_exp(self, strategy, **kwargs):
        if self.consolidate:
            self._consolidate(strategy)
        else:  # the model is reused by the next client: take the regulariser's hooks off it
            release = getattr(self.regularizer, "release", None)
            if release is not None:
                release()
        # Unhook between experiences: the model is copied, pickled and logged without the plugin.
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        self._features = None

    def _consolidate(self, strategy):
        data = strategy.experience.dataset.eval()
        loader = torch.utils.data.DataLoader(data, batch_size=strategy.train_mb_size, shuffle=False,
                                             collate_fn=getattr(data, "collate_fn", None))
        device = strategy.device
        batches = ((b[0].to(device), b[1].to(device), b[-1].to(device)) for b in loader)
        self.regularizer.after_experience(strategy.model, batches)


def build_regularizer(spec, n_classes: int) -> Regularizer:
    """The regulariser of one plugin spec of the config, built as its catalogue entry says."""
    from lifelong import catalogue

    return catalogue.build(spec, n_classes=n_classes, forward=avalanche_forward_fn)
