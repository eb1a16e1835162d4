"""A generated federated population whose clients' data is drawn on demand from their id and the seed.

The pooled streams split one dataset across the clients (``tasks/partition.py``), so the whole
dataset is in memory and every client's share is cut from it. A population of 10^5 clients
cannot work that way, and need not: here a client's data in an experience is a pure function of
(seed, client id, experience), drawn when the client is sampled and dropped after its round, so
the clients a round does not sample cost nothing but their id.

The generative model follows the spirit of LEAF's Synthetic(alpha, beta) (Caldas et al. 2018,
"LEAF: A Benchmark for Federated Settings"; Li et al. 2020, FedProx, Sec. 5.1): clients differ in
how much data they hold, which classes they hold, and how their inputs look.

* Classes ``c`` have centres ``mu_c ~ N(0, I_d)`` (from the seed alone: the task all clients share).
* Client ``k`` holds ``n_k = clip(round(size_median * exp(size_sigma * z_k)), 1, size_max)``
  samples of each experience, ``z_k ~ N(0, 1)``: log-normal, heavy-tailed sizes, as LEAF's
  synthetic data and real deployments have (a few clients hold most samples).
* Its class mix is ``p_k ~ Dirichlet(label_alpha)`` over all classes; in experience ``e`` it draws
  labels from ``p_k`` restricted to the experience's classes (class-incremental: 10 classes split
  evenly across the experiences).
* Its inputs are shifted by its own ``v_k ~ N(0, shift^2 I_d)``: ``x = mu_y + v_k + noise * eps``.

Test data: a client's own test samples of an experience are drawn like its training samples (a
``stream.test_fraction`` share of ``n_k``, at least one). The stream's pooled splits — the global
model's test set, and what a non-federated run trains on — are the data of a fixed *panel* of
clients (ids ``0..panel-1``: ids are exchangeable, so they are a random sample of the population),
which also gives per-client evaluation its clients (``client_test_indices``).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch

from lifelong.config import PopulationConfig

N_CLASSES = 10
# Tags that keep the random streams of different purposes apart (numpy's SeedSequence entropy).
_CENTRES, _PROFILE, _TRAIN, _TEST, _VALIDATION = 0, 1, 2, 3, 4


@dataclass(frozen=True)
class Population:
    cfg: PopulationConfig
    seed: int
    classes_per_experience: tuple[tuple[int, ...], ...]
    test_fraction: float
    #: Evaluate on fresh validation draws of the panel instead of its test draws (hyperparameter search).
    validation: bool = False

    @cached_property
    def centres(self) -> np.ndarray:
        return np.random.default_rng([self.seed, _CENTRES]).standard_normal((N_CLASSES, self.cfg.features))

    def profile(self, client: int) -> tuple[int, np.ndarray, np.ndarray]:
        """Client ``client``'s samples per experience, class mix and input shift."""
        rng = np.random.default_rng([self.seed, _PROFILE, client])
        c = self.cfg
        size = int(np.clip(round(c.size_median * np.exp(c.size_sigma * rng.standard_normal())), 1, c.size_max))
        mix = rng.dirichlet(np.full(N_CLASSES, c.label_alpha))
        shift = c.shift * rng.standard_normal(c.features)
        return size, mix, shift

    def sizes(self, clients: range) -> np.ndarray:
        return np.array([self.profile(k)[0] for k in clients])

    def client_data(self, client: int, experience: int, split: str = "train") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Client ``client``'s (x, y, task) samples of ``experience``: ``split`` is train, test or validation."""
        size, mix, shift = self.profile(client)
        if split != "train":
            size = max(1, round(self.test_fraction * size))
        tag = {"train": _TRAIN, "test": _TEST, "validation": _VALIDATION}[split]
        rng = np.random.default_rng([self.seed, tag, client, experience])
        classes = np.array(self.classes_per_experience[experience])
        p = mix[classes] + 1e-12  # (a class the client holds almost none of still has a tiny chance)
        y = rng.choice(classes, size=size, p=p / p.sum())
        x = self.centres[y] + shift + self.cfg.noise * rng.standard_normal((size, self.cfg.features))
        return (torch.as_tensor(x, dtype=torch.float32), torch.as_tensor(y, dtype=torch.long),
                torch.zeros(size, dtype=torch.long))

    def class_counts(self, clients: range, experience: int) -> np.ndarray:
        """clients × classes training-sample counts of ``experience`` (what shows the skew)."""
        return np.stack([np.bincount(self.client_data(k, experience)[1].numpy(), minlength=N_CLASSES)
                         for k in clients])

    def panel_data(self, experience: int, split: str) -> tuple[tuple[torch.Tensor, torch.Tensor, torch.Tensor], list[int]]:
        """The panel's samples of ``experience`` concatenated, and each panel client's count."""
        parts = [self.client_data(k, experience, split) for k in range(self.cfg.panel)]
        joined = tuple(torch.cat([p[i] for p in parts]) for i in range(3))
        return joined, [len(p[1]) for p in parts]

    def eval_split(self) -> str:
        return "validation" if self.validation else "test"
