"""OnePrompt with (optional) virtual outlier regularisation, as an Avalanche plugin.

Huang et al., "OVOR: OnePrompt with Virtual Outlier Regularization for Rehearsal-Free
Class-Incremental Learning", ICLR 2024 (reference code jpmorganchase/ovor, ``learners/default.py``).
The math (energies, outliers, the VOR loss, the head-only phase) is in ``strategies/ovor.py``; the
prompted ViT in ``tasks/vit.py``. This adapter does what the reference's learner does around them:

* the backbone is frozen; the prompt and the head train (one prompt for all tasks, no pool);
* the head grows with the classes: classes not seen yet are never predicted;
* phase A: cross-entropy with the logits of earlier tasks' classes masked out (-inf);
* phase B (``vor``): after each experience, train only the head on the current task's features
  plus virtual outliers.

In a federated client (``clients/learner.py``) one plugin serves every client of a process, one
round at a time, and an experience spans several rounds; :meth:`OnePromptPlugin.start_round`
sets what the plugin would otherwise carry between experiences from the round itself: the
classes seen so far come from the stream's class order (public, the same for every client, so a
client not sampled in some experience, or one whose share lacks a class, masks exactly as the
others do), and phase B runs only when the server says the round ends the experience.
"""

from __future__ import annotations

import torch
from avalanche.core import SupervisedPlugin

from lifelong.strategies.ovor import VORConfig, train_head_with_vor


class OnePromptPlugin(SupervisedPlugin):
    def __init__(self, model, vor: VORConfig | None, seed: int = 0):
        super().__init__()
        # Freeze now: Avalanche builds the experience's optimizer before plugins' hooks run.
        model.freeze_backbone()
        model.use_prompt = True
        model.active.zero_()
        self.vor, self.seed = vor, seed
        self.current: list[int] = []
        self.seen: list[int] = []
        self.last_vor: dict = {}
        #: Whether phase B follows this experience's training: always in the continual flow; a
        #: federated client's round says (:meth:`start_round`).
        self.vor_due = True

    # Checkpoints (``bridges/avalanche/checkpoint.py``): the classes seen so far decide which logits are
    # masked and the VOR generator's seed; the prompt, head and active-class mask are the model's
    # (``active`` is a buffer), the frozen backbone and prompt switch are set again by ``__init__``.
    def checkpoint_state(self) -> dict:
        return {"current": list(self.current), "seen": list(self.seen), "last_vor": dict(self.last_vor)}

    def load_checkpoint_state(self, state: dict, device) -> None:
        self.current, self.seen = list(state["current"]), list(state["seen"])
        self.last_vor = dict(state["last_vor"])

    def start_round(self, seen: list[int], ends_experience: bool, seed: int) -> None:
        """Ready the plugin for one federated client's round (nothing of the previous client stays).

        ``seen``: the classes of the stream's experiences up to the round's (:func:`seen_classes`);
        ``ends_experience``: the server's word that the round is the experience's last, the one
        round in which phase B runs (a client cannot tell otherwise); ``seed``: the client's round
        seed, for the outliers.
        """
        self.seen, self.vor_due, self.seed, self.last_vor = sorted(seen), ends_experience, seed, {}

    def before_training_exp(self, strategy, **kwargs):
        self.current = sorted(int(c) for c in strategy.experience.classes_in_this_experience)
        self.seen = sorted(set(self.seen) | set(self.current))
        # Exactly the seen classes (not "also these"): a federated client loads a global model whose
        # mask it must not inherit (the initial model's is all classes).
        strategy.model.active.zero_()
        strategy.model.active[self.seen] = True

    def after_forward(self, strategy, **kwargs):
        if not strategy.is_training:
            return
        earlier = torch.ones(strategy.mb_output.shape[1], dtype=torch.bool, device=strategy.mb_output.device)
        earlier[self.current] = False
        strategy.mb_output = strategy.mb_output.masked_fill(earlier, float("-inf"))

    @torch.no_grad()
    def _features(self, strategy):
        model = strategy.model
        model.eval()
        data = strategy.experience.dataset.eval()
        x, y, _ = torch.utils.data.default_collate([data[i] for i in range(len(data))])
        feats = torch.cat([model.features(x[i : i + 512].to(strategy.device)) for i in range(0, len(x), 512)])
        model.train()
        return feats, y.to(strategy.device)

    def after_training_exp(self, strategy, **kwargs):
        if self.vor is None or not self.vor_due:
            return
        feats, labels = self._features(strategy)
        gen = torch.Generator(device=feats.device).manual_seed(self.seed + len(self.seen))
        self.last_vor = train_head_with_vor(strategy.model.head, feats, labels, self.current, self.seen,
                                            self.vor, generator=gen)


def seen_classes(classes_per_experience: list[list[int]], experience: int) -> list[int]:
    """The classes of experiences 0..``experience``: those the head may predict after it."""
    return sorted({int(c) for classes in classes_per_experience[: experience + 1] for c in classes})
