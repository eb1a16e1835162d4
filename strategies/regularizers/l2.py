"""L2 parameter regularisation toward the previous solution.

As studied in Smith et al., "A Closer Look at Rehearsal-Free Continual Learning", CVPR-W 2023
(arXiv 2203.17269): penalty ``eps * sum ||theta - theta*||^2`` over the backbone's parameters —
the classifier head excluded — with ``theta*`` the parameters at the end of the previous experience
(``anchor="previous"``) or the initial / pretrained weights (``anchor="initial"``). No official code
was found; this follows the paper's description and a co-author's research code as summarised in
shared/PAPERS.md.
"""

from __future__ import annotations

from typing import Literal

from torch import Tensor

from lifelong.strategies.regularizers.base import named_params, pack, penalty_sum, unpack

Scope = Literal["backbone", "head", "all"]


def _scoped(model, scope: Scope):
    params = named_params(model)
    if scope == "all":
        return params
    head = scope == "head"
    return {k: p for k, p in params.items() if k.startswith("head.") == head}


class L2:
    """``scope="backbone"`` is the paper's; ``"head"`` regularises a linear probe on a frozen backbone."""

    def __init__(self, eps: float, anchor: Literal["previous", "initial"] = "previous", scope: Scope = "backbone"):
        if eps < 0:
            raise ValueError(f"l2 eps must be >= 0, got {eps}")
        self.eps, self.anchor_mode, self.scope = eps, anchor, scope
        self.anchor: dict[str, Tensor] = {}

    def _snapshot(self, model) -> None:
        self.anchor = {k: p.detach().clone() for k, p in _scoped(model, self.scope).items()}

    def penalty(self, model, x, y, out, features=None) -> Tensor:
        params = _scoped(model, self.scope)
        terms = [((params[k] - a) ** 2).sum() for k, a in self.anchor.items() if k in params]
        return self.eps * penalty_sum(terms, out)

    def before_experience(self, model, classes) -> None:
        if self.anchor_mode == "initial" and not self.anchor:
            self._snapshot(model)  # the weights the learner starts from (pretrained, if it was)

    def after_experience(self, model, batches) -> None:
        if self.anchor_mode == "previous":
            self._snapshot(model)

    def state_dict(self) -> dict[str, Tensor]:
        return pack("anchor", self.anchor)

    def load_state_dict(self, state) -> None:
        self.anchor = unpack("anchor", state)
