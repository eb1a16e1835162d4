"""Training health: did the model learn what it was just trained on, or did it stop learning?

A model that stopped learning looks like forgetting in an accuracy matrix: the cell of the
experience just trained sits at chance, old cells at zero. Before this check, a CNN on 28×28
digits predicted one class of its last experience (0.49 on two classes) and nothing said so.
After each experience (and each federated round) the flows probe the model:

- **accuracy within the experience's classes** on what it just trained on (the logits restricted
  to that experience's classes, so forgetting of other classes does not count), against chance
  (one over the number of those classes);
- **dead units**: the share of ReLU units (a channel or a feature) that fire on none of the
  probed samples;
- **non-finite** weights or outputs;
- the **update norm** the caller measured (the mean gradient norm over the experience, or the
  norm of a federated round's global update): vanished updates mean no learning.

A probe with a problem is reported loudly by the flows (a warning line naming the experience and
the figure, MLflow metrics ``health/*`` and tags ``lifelong.health*``), and ``lifelong results``
shows it. Thresholds are stated here, once.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

#: A model has learned an experience when its within-experience accuracy is at least this share
#: of the way from chance to perfect (two classes: ≥ 0.55; ten classes: ≥ 0.19).
LEARNED_MARGIN = 0.1
#: Share of ReLU units that fire on no probed sample at which the model counts as dead.
DEAD_SHARE = 0.9
#: An update (gradient or round) norm below this counts as vanished.
VANISHED_NORM = 1e-7
#: Samples probed (the first ones of the experience: probing is deterministic).
PROBE_SAMPLES = 512


@dataclass(frozen=True)
class Health:
    where: str  # "experience 3" or "experience 3, round 12"
    within_accuracy: float
    chance: float
    n_classes: int
    dead_units: float  # NaN: the model has no ReLU (the ViT)
    nonfinite: bool
    update_norm: float | None = None

    @property
    def learned(self) -> bool:
        return self.within_accuracy - self.chance >= LEARNED_MARGIN * (1 - self.chance)

    @property
    def problems(self) -> list[str]:
        found = []
        if self.nonfinite:
            found.append(f"{self.where}: non-finite weights or outputs")
        if not self.learned:
            found.append(f"{self.where}: not learned — accuracy {self.within_accuracy:.3f} within its "
                         f"{self.n_classes} classes, chance {self.chance:.3f}")
        if self.dead_units >= DEAD_SHARE:
            found.append(f"{self.where}: {self.dead_units:.0%} of ReLU units never fire")
        if self.update_norm is not None and (not math.isfinite(self.update_norm) or self.update_norm < VANISHED_NORM):
            found.append(f"{self.where}: update norm {self.update_norm:.2g}")
        return found

    @property
    def ok(self) -> bool:
        return not self.problems

    def metrics(self) -> dict[str, float]:
        values = {"health/within_acc": self.within_accuracy, "health/chance": self.chance,
                  "health/nonfinite": float(self.nonfinite), "health/ok": float(self.ok)}
        if not math.isnan(self.dead_units):
            values["health/dead_units"] = self.dead_units
        if self.update_norm is not None and math.isfinite(self.update_norm):
            values["health/update_norm"] = self.update_norm
        return values


@torch.no_grad()
def probe(model: nn.Module, forward, x: torch.Tensor, y: torch.Tensor, t: torch.Tensor, classes: Sequence[int],
          where: str, update_norm: float | None = None, device: str | torch.device = "cpu") -> Health:
    """Probe ``model`` on (x, y) with task labels t, data of one experience whose classes are ``classes``.

    ``forward(model, x, t)`` gives the logits (the flows pass Avalanche's task-aware forward).
    """
    x, y, t = (a[:PROBE_SAMPLES].to(device) for a in (x, y, t))
    fired: dict[nn.Module, torch.Tensor] = {}

    def record(module, _inputs, output):
        alive = (output > 0).transpose(0, 1).reshape(output.shape[1], -1).any(1)
        fired[module] = fired[module] | alive if module in fired else alive

    hooks = [m.register_forward_hook(record) for m in model.modules() if isinstance(m, nn.ReLU)]
    was_training = model.training
    model.eval()
    try:
        logits = forward(model, x, t)
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    cols = torch.as_tensor(list(classes), device=logits.device)
    predicted = cols[logits[:, cols].argmax(1)]
    within = float((predicted == y).float().mean()) if len(y) else float("nan")
    units = sum(len(f) for f in fired.values())
    dead = sum(int((~f).sum()) for f in fired.values()) / units if units else float("nan")
    nonfinite = not bool(torch.isfinite(logits).all()) or any(
        not bool(torch.isfinite(p).all()) for p in model.parameters())
    return Health(where, within, 1 / len(cols), len(cols), dead, nonfinite, update_norm)
