"""Past-logit masking: an experience's loss sees only its own classes' logits.

Smith et al., "A Closer Look at Rehearsal-Free Continual Learning" (2022), train their
class-incremental regularisation baselines this way (as in a co-author's research code, the
logits of classes learned before are set to −∞ for the current task's loss): the cross-entropy
no longer teaches the shared head to push old classes down, which is what fine-tuning's head
does and what parameter regularisers (head excluded) cannot stop. Evaluation is unmasked.
"""

from __future__ import annotations

import torch
from avalanche.core import SupervisedPlugin


class PastLogitMaskPlugin(SupervisedPlugin):
    """During training, every logit but the current experience's classes' is −∞."""

    checkpoint_stateless = True  # the experience's classes are read again at every experience

    def __init__(self):
        super().__init__()
        self.classes: list[int] = []

    def before_training_exp(self, strategy, **kwargs):
        self.classes = sorted(int(c) for c in strategy.experience.classes_in_this_experience)

    def after_forward(self, strategy, **kwargs):
        out = strategy.mb_output
        keep = torch.zeros(out.shape[-1], dtype=torch.bool, device=out.device)
        keep[self.classes] = True
        strategy.mb_output = out.masked_fill(~keep, float("-inf"))
