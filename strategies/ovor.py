"""Virtual Outlier Regularization (VOR) of OVOR: energy, loss, outlier synthesis, head training.

Paper: Huang et al., "OVOR: OnePrompt with Virtual Outlier Regularization for Rehearsal-Free
Class-Incremental Learning", ICLR 2024 (reference code: jpmorganchase/ovor). Outliers follow
NPOS: Tao et al., "Non-parametric Outlier Synthesis", ICLR 2023.

After the normal training of a task, the current task's features are recomputed (prompt
applied), virtual outliers are synthesised around them, and only the head is trained with
CE + lambda * [Huber(relu(E_id - t_id)) + Huber(relu(t_ood - E_ood))], where the energy
E(x) = -logsumexp over the current task's logits. Low ID energy and high outlier energy keep the
current task's logits from firing on inputs that are not its own (other tasks' classes).

Reference files followed:
- ``learners/ood.py`` (``NPOS``): boundary points, candidate selection, ``loss``.
- ``learners/default.py`` (``_train_one_epoch``, ``_train_one_epoch_ood``, ``_get_ood_samples``):
  the CE masking, which logits the energies use, features and outliers resampled every VOR epoch.
- ``configs/common.yaml``: lmda 0.1, cov 0.1, thres_id -15, thres_ood -3; ``NPOS`` defaults
  K 50, select 50, sample_from 600, num_per_class 40, id_bsz 128; Huber (delta 1, mean).

What the reference does, and where this module deviates:
- CE: ``logits[:, :subset_end]`` with ``logits[:, :subset_start] = -inf``, in normal training and
  in the VOR phase alike. Earlier classes are masked and later classes cut off, so the CE is a
  CE over the current task's classes only. ``vor_loss`` masks every column outside ``class_idx``.
- The head sees raw (unnormalised) final-norm [CLS] features in both phases; only the k-NN search
  uses L2-normalised ID features (faiss on ``normed``).
- Candidates: the release computes boundary points but samples ``cov * noise`` around the origin
  and searches these raw candidates against the normalised ID set. That is ``anchor="origin"``.
  The default ``anchor="boundary"`` is the paper, done as the NPOS code (deeplearning-wisc/npos,
  ``CIFAR/KNN.py``, ``generate_outliers``) does it: raw boundary feature + ``cov * noise``,
  ranked after L2-normalising the candidate, returned raw (``cov`` is in raw feature units, in
  both codes). Outliers thus always live in the raw feature space the head is trained and
  evaluated on. As in the OVOR release (unlike NPOS, which keeps the best few per boundary
  point), the farthest candidates are kept globally.
- The release draws ``sample_from`` offsets once and repeats them for every boundary point (with
  ``anchor="origin"`` the candidates are then ``select`` exact copies of each other); here every
  candidate gets its own noise. faiss returns squared L2 distances, ``torch.cdist`` plain L2: the
  ranking is the same. As with faiss searching an index that holds the query, a point counts as
  its own first neighbour when boundary points are ranked.
- Thresholds -15/-3 assume ViT-B logit scales; ``calibrate_thresholds`` derives them from the
  head's ID energies instead (``VORConfig.calibrate``, on by default). The release continues the
  cosine learning-rate schedule into the VOR epochs; here the head gets its own Adam.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

# Reference thresholds (configs/common.yaml); only their ratio is used when calibrating.
REF_T_ID, REF_T_OOD = -15.0, -3.0
MIN_GAP = 1.0  # nats; keeps t_ood above t_id when the ID energies are near zero


def energy(logits: torch.Tensor, class_idx: list[int]) -> torch.Tensor:
    """Per-sample energy over the given class columns: -logsumexp_c logits[:, c]."""
    return -torch.logsumexp(logits[:, class_idx], dim=1)


def _current_only(logits: torch.Tensor, class_idx: list[int]) -> torch.Tensor:
    masked = torch.full_like(logits, float("-inf"))
    masked[:, class_idx] = logits[:, class_idx]
    return masked


def vor_loss(logits_id: torch.Tensor, y_id: torch.Tensor, logits_ood: torch.Tensor, class_idx: list[int],
             t_id: float, t_ood: float, lam: float) -> torch.Tensor:
    """CE over the current classes + lam * (Huber(relu(E_id - t_id), 0) + Huber(relu(t_ood - E_ood), 0)).

    ``y_id`` are global labels (columns of ``logits_id``), all in ``class_idx``. The CE masks all
    other columns to -inf, which equals the reference's "cut later classes, -inf earlier ones".
    """
    ce = F.cross_entropy(_current_only(logits_id, class_idx), y_id)
    id_gap = F.relu(energy(logits_id, class_idx) - t_id)  # ID energy should stay below t_id
    ood_gap = F.relu(t_ood - energy(logits_ood, class_idx))  # outlier energy should stay above t_ood
    reg = F.huber_loss(id_gap, torch.zeros_like(id_gap), delta=1.0) + \
        F.huber_loss(ood_gap, torch.zeros_like(ood_gap), delta=1.0)
    return ce + lam * reg


def kth_nn_distance(queries: torch.Tensor, reference: torch.Tensor, k: int, chunk: int = 4096) -> torch.Tensor:
    """L2 distance from each query to its k-th nearest reference point (1-based; chunked for memory)."""
    k = min(k, reference.shape[0])
    return torch.cat([torch.cdist(q, reference).topk(k, dim=1, largest=False).values[:, -1]
                      for q in queries.split(chunk)])


def boundary_indices(normed: torch.Tensor, k: int, select: int) -> torch.Tensor:
    """Indices of the ``select`` points farthest from their k-th neighbour (self counts as first)."""
    return kth_nn_distance(normed, normed, k).topk(min(select, normed.shape[0])).indices


def synthesize_outliers(features: torch.Tensor, n_outliers: int, k: int = 50, select: int = 50,
                        sample_from: int = 600, cov: float = 0.1, anchor: str = "boundary",
                        generator: torch.Generator | None = None) -> torch.Tensor:
    """NPOS virtual outliers for ID ``features`` (N, D) → (min(n_outliers, candidates), D).

    Distances are k-NN distances to the L2-normalised ID set; ``k`` and ``select`` are clamped
    to N. Outliers are returned in the space of ``features`` (raw, what the head sees):
    - ``"boundary"`` (paper, NPOS code): candidates = boundary point + ``cov * noise``, ranked after
      L2-normalising them;
    - ``"origin"`` (OVOR release): candidates = ``cov * noise``, ranked without normalising them.
    The ``n_outliers`` candidates farthest from the ID set are kept. ``generator`` must live on
    ``features.device``.
    """
    if anchor not in ("boundary", "origin"):
        raise ValueError(f"anchor must be 'boundary' or 'origin', got {anchor!r}")
    features = features.detach()
    normed = F.normalize(features, dim=1)
    anchors = features[boundary_indices(normed, k, select)]
    noise = cov * torch.randn(anchors.shape[0], sample_from, features.shape[1], generator=generator,
                              device=features.device, dtype=features.dtype)
    if anchor == "boundary":
        candidates = (anchors[:, None, :] + noise).reshape(-1, features.shape[1])
        queries = F.normalize(candidates, dim=1)
    else:
        candidates = queries = noise.reshape(-1, features.shape[1])
    far = kth_nn_distance(queries, normed, k).topk(min(n_outliers, candidates.shape[0])).indices
    return candidates[far]


def calibrate_thresholds(energies_id: torch.Tensor, q: float = 0.5) -> tuple[float, float]:
    """Thresholds from the head's ID energies: t_id = q-quantile, t_ood = t_id + max(0.8 |t_id|, 1).

    The reference's -15/-3 only make sense at ViT-B logit scales. A quantile puts t_id at the same
    place in *our* ID energy distribution whatever the scale: with the median, the ID term pulls
    the less confident half of the ID samples down to the typical ID energy. The gap 0.8 |t_id|
    reproduces the reference ratio t_ood = t_id * (-3 / -15) = 0.2 t_id for negative t_id; the
    1-nat floor keeps t_ood > t_id when ID energies are near or above zero (an untrained head).
    """
    t_id = torch.quantile(energies_id.detach().float(), q).item()
    gap = max((1 - REF_T_OOD / REF_T_ID) * abs(t_id), MIN_GAP)
    return t_id, t_id + gap


@dataclass(frozen=True)
class VORConfig:
    """Reference defaults; ``calibrate`` replaces ``t_id``/``t_ood`` by ``calibrate_thresholds``."""

    lam: float = 0.1
    cov: float = 0.1
    t_id: float = REF_T_ID
    t_ood: float = REF_T_OOD
    calibrate: bool = True
    k: int = 50
    select: int = 50
    sample_from: int = 600
    num_per_class: int = 40
    anchor: str = "boundary"
    epochs: int = 4
    lr: float = 1e-3
    batch_size: int = 128  # reference id_bsz

    def __post_init__(self):
        if self.anchor not in ("boundary", "origin"):
            raise ValueError(f"anchor must be 'boundary' or 'origin', got {self.anchor!r}")
        if min(self.k, self.select, self.sample_from, self.num_per_class, self.batch_size) < 1:
            raise ValueError("k, select, sample_from, num_per_class and batch_size must be >= 1")
        if self.epochs < 0:
            raise ValueError(f"epochs must be >= 0, got {self.epochs}")
        if not self.calibrate and self.t_ood <= self.t_id:
            raise ValueError(f"t_ood ({self.t_ood}) must be above t_id ({self.t_id})")


def train_head_with_vor(head: nn.Linear, features: torch.Tensor, labels: torch.Tensor, class_idx: list[int],
                        seen_classes: list[int], cfg: VORConfig,
                        generator: torch.Generator | None = None) -> dict:
    """The VOR phase: train only ``head`` on the current task's features and virtual outliers.

    ``features``/``labels`` are the current task's raw features (prompt applied) and global labels;
    ``class_idx`` its classes, a subset of ``seen_classes``. Under the reference's convention
    (CE over seen classes with earlier ones at -inf) the CE reduces to the current classes, so
    ``seen_classes`` only checks the call. Outliers are resampled every epoch, as the reference
    does; each ID batch is paired with an equal share of them. ``generator`` (on the head's
    device) makes the run deterministic.
    """
    if not set(class_idx) <= set(seen_classes):
        raise ValueError(f"class_idx {class_idx} are not all among seen_classes {seen_classes}")
    if not set(labels.unique().tolist()) <= set(class_idx):
        raise ValueError("labels must all belong to class_idx (the current task)")
    device = head.weight.device
    features, labels = features.detach().to(device), labels.to(device)

    if cfg.calibrate:
        with torch.no_grad():
            t_id, t_ood = calibrate_thresholds(energy(head(features), class_idx))
    else:
        t_id, t_ood = cfg.t_id, cfg.t_ood

    opt = torch.optim.Adam(head.parameters(), lr=cfg.lr)
    n = features.shape[0]
    n_batches = math.ceil(n / cfg.batch_size)
    epoch_loss = float("nan")
    outliers = features.new_empty(0, features.shape[1])
    for _ in range(cfg.epochs):
        outliers = synthesize_outliers(features, cfg.num_per_class * len(class_idx), cfg.k, cfg.select,
                                       cfg.sample_from, cfg.cov, cfg.anchor, generator)
        outliers = outliers[torch.randperm(len(outliers), generator=generator, device=device)]
        ood_batches = outliers.tensor_split(min(n_batches, len(outliers)))
        order = torch.randperm(n, generator=generator, device=device)
        total = 0.0
        for i, idx in enumerate(order.split(cfg.batch_size)):
            loss = vor_loss(head(features[idx]), labels[idx], head(ood_batches[i % len(ood_batches)]),
                            class_idx, t_id, t_ood, cfg.lam)
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
        epoch_loss = total / n

    with torch.no_grad():
        e_id = energy(head(features), class_idx).mean().item()
        e_ood = energy(head(outliers), class_idx).mean().item()  # last epoch's outliers (nan if none)
    return {"loss": epoch_loss, "energy_id": e_id, "energy_ood": e_ood, "t_id": t_id, "t_ood": t_ood,
            "n_outliers": len(outliers)}
