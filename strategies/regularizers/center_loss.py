"""Center-loss regularisation for continual learning.

"Center Loss Regularization for Continual Learning" (2021; no reference code found). Loss =
task loss + ``lambda * L_C`` on the penultimate features, ``L_C = 1/2 * mean_i ||f_i - c_{y_i}||^2``
(Wen et al. 2016 write the sum over the mini-batch; the mean keeps ``lambda`` independent of the
batch size). Centers follow Wen et al.'s rule each iteration:
``c_j <- c_j - alpha * sum_i [y_i = j](c_j - f_i) / (1 + sum_i [y_i = j])``.

After an experience its classes' centers and classifier rows are frozen, so later experiences'
features are pulled onto the old centers and the decision boundaries stay put. In the paper's
(domain-incremental) setting every experience has every class, so this freezes all centers and
the whole classifier after the first experience, as the paper does. In class-incremental
streams, new classes get their centers and head rows when first seen and are frozen after their
experience: that is our extension, not the paper's.

A center starts at the mean feature of its class in the first mini-batch that has it (our
choice: a zero start would first pull every feature to the origin).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class CenterLoss:
    def __init__(self, lam: float, alpha: float, n_classes: int):
        if lam < 0 or not 0 < alpha <= 1:
            raise ValueError(f"center_loss needs lambda >= 0 and 0 < alpha <= 1, got {lam}, {alpha}")
        self.lam, self.alpha, self.n_classes = lam, alpha, n_classes
        self.centers: Tensor | None = None
        self.seen = torch.zeros(n_classes, dtype=torch.bool)
        self.frozen = torch.zeros(n_classes, dtype=torch.bool)
        self._current: set[int] = set()
        self._handles: list = []
        self._rows: dict[str, Tensor] = {}

    # -- the math ---------------------------------------------------------------------------
    def loss(self, features: Tensor, y: Tensor) -> Tensor:
        """``1/2 * mean_i ||f_i - c_{y_i}||^2``."""
        return 0.5 * ((features - self.centers[y].to(features)) ** 2).sum(1).mean()

    @torch.no_grad()
    def init_centers(self, features: Tensor, y: Tensor) -> None:
        """A class's first sighting sets its center to the class mean of that mini-batch."""
        f, y = features.detach().cpu(), y.cpu()
        if self.centers is None:
            self.centers = torch.zeros(self.n_classes, f.shape[1])
        for j in torch.unique(y).tolist():
            if not self.seen[j] and not self.frozen[j]:
                self.centers[j] = f[y == j].mean(0)
                self.seen[j] = True

    @torch.no_grad()
    def update_centers(self, features: Tensor, y: Tensor) -> None:
        """Wen et al.'s rule for the classes that are not frozen (first sightings initialise)."""
        self.init_centers(features, y)
        f, y = features.detach().cpu(), y.cpu()
        for j in torch.unique(y).tolist():
            if self.frozen[j]:
                continue
            fj = f[y == j]
            delta = (self.centers[j] - fj).sum(0) / (1 + len(fj))
            self.centers[j] -= self.alpha * delta

    # -- the Regularizer interface -----------------------------------------------------------
    def penalty(self, model, x, y, out, features=None) -> Tensor:
        if features is None:
            raise ValueError("center_loss needs the penultimate features (the model's head input)")
        self.init_centers(features, y)  # classes seen for the first time get their center
        loss = self.lam * self.loss(features, y)  # Wen et al.: the loss uses the current centers,
        if model.training:
            self.update_centers(features, y)  # which are updated afterwards
        return loss

    def before_experience(self, model, classes) -> None:
        head = model.head
        if not isinstance(head, nn.Linear):
            raise ValueError("center_loss needs a single-head classifier (class- or domain-incremental stream)")
        self._current = set(classes)
        self._unhook()
        # Frozen classes' rows get no gradient ...
        self._handles = [head.weight.register_hook(lambda g: g.masked_fill(self.frozen.to(g.device)[:, None], 0))]
        if head.bias is not None:
            self._handles.append(head.bias.register_hook(lambda g: g.masked_fill(self.frozen.to(g.device), 0)))
        self._rows = {k: v.detach().clone() for k, v in head.state_dict().items()}

    @torch.no_grad()
    def after_update(self, model) -> None:
        """... and are put back after each step: an optimizer's momentum or weight decay (Adam
        keeps its state across experiences in Avalanche) would otherwise still move them."""
        if not bool(self.frozen.any()):
            return
        for name, saved in self._rows.items():
            param = getattr(model.head, name)
            param[self.frozen.to(param.device)] = saved[self.frozen].to(param.device)

    def release(self) -> None:
        """Take the gradient hooks off the model (a federated round ends without consolidating)."""
        self._unhook()

    def _unhook(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def after_experience(self, model, batches) -> None:
        for j in self._current:
            self.frozen[j] = True
        self._unhook()  # the model leaves training (to be copied or logged) without our hooks

    def state_dict(self) -> dict[str, Tensor]:
        state = {"seen": self.seen.clone(), "frozen": self.frozen.clone()}
        if self.centers is not None:
            state["centers"] = self.centers.clone()
        return state

    def load_state_dict(self, state) -> None:
        self.seen, self.frozen = state["seen"].clone(), state["frozen"].clone()
        self.centers = state["centers"].clone() if "centers" in state else None
