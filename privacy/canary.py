"""Canaries for an empirical privacy audit in one training run.

Steinke, Nasr & Jagielski, "Privacy Auditing with One (1) Training Run" (NeurIPS 2023,
arXiv 2305.08846). ``m`` canaries are drawn; each is included in the training run independently
with probability 1/2; after the run an auditor scores every canary and guesses "included" for the
highest scores. If the run is (epsilon, delta)-DP with respect to each canary, the number of
correct guesses is (nearly) dominated by a Binomial(guesses, e^epsilon / (1 + e^epsilon)) — so many
correct guesses *prove* a lower bound on epsilon, at a stated confidence, from a single run.

Here a canary is a *client* whose update is a fixed random direction (the paper's gradient-space
"Dirac/random canary", lifted to user level): a unit vector over the model's private parameters,
scaled to the clip bound. The auditor sees the final global model and scores canary ``i`` by the
projection of the model's total change on its (clipped) direction. Random directions in a space of
tens of thousands of parameters are nearly orthogonal to each other and to the other clients'
updates, so without noise the included canaries stand out.

The bound itself is computed by a well-kept library: ``jax_privacy.auditing.CanaryScoreAuditor
.epsilon_one_run`` (Google DeepMind's implementation of the paper's Theorem, with its delta term
and a Bonferroni correction over thresholds). This module draws the canaries and scores them.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor


def draw_canaries(dim: int, m: int, seed: int) -> Tensor:
    """``m`` unit vectors in ``R^dim``, seeded (rows of an ``m x dim`` float32 matrix).

    The generator is seeded from ``("canaries", seed)``, not ``seed`` itself: the server's noise
    generator is seeded with the run's seed, and a canary drawn from the same stream would *be*
    the first round's noise direction (an audit once scored a left-out canary at 30 standard
    deviations that way)."""
    if m < 2:
        raise ValueError(f"an audit needs at least 2 canaries, got {m}")
    g = torch.Generator().manual_seed(int(np.random.SeedSequence([seed, 0xCA2A]).generate_state(1, np.uint64)[0] >> 1))
    directions = torch.randn(m, dim, generator=g)
    return directions / directions.norm(dim=1, keepdim=True)


def draw_inclusion(m: int, seed: int) -> np.ndarray:
    """Which canaries take part: each independently with probability 1/2 (the paper's design)."""
    return np.random.default_rng([seed, 1]).random(m) < 0.5


def canary_scores(change: Tensor, directions: Tensor) -> np.ndarray:
    """Each canary's score: the model's total change projected on its unit direction."""
    unit = directions / directions.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return (unit.double() @ change.double()).numpy()


def empirical_epsilon(scores: np.ndarray, included: np.ndarray, delta: float, significance: float = 0.05) -> float:
    """The lower bound on epsilon that the scores prove at confidence ``1 - significance``."""
    from jax_privacy.auditing import CanaryScoreAuditor  # (imports jax: only when auditing)

    if included.all() or not included.any():
        raise ValueError("the audit needs both included and left-out canaries")
    auditor = CanaryScoreAuditor(scores[included], scores[~included])
    return float(auditor.epsilon_one_run(significance, delta))
