"""User-level DP for federated rounds: clip each client's update, add Gaussian noise once to the sum.

Pelikan, Azam, Feldman, Silovsky, Talwar, Brinton, Likhomanenko, "Enabling Differentially Private
Federated Learning for Speech Recognition: Benchmarks, Adaptive Optimizers and Gradient Clipping",
NeurIPS 2025 (arXiv 2310.00098). Reference code followed: apple-aiml-research/ml-pfl4asr,
``pfl4asr/pfl4asr/utils/pfunctions.py`` (``clip_grads``, ``clip_layer_grads``,
``clip_layer_grads_params``, ``gauss_noise``) as wired in ``experiments/train_pfl.py`` (``ConfigDP``)
and ``pfl4asr/pfl4asr/pfl/server.py`` (``Server.step``). Per-layer clipping with independent
bounds is McMahan et al., "Learning Differentially Private Recurrent Language Models", ICLR 2018
(the definition optax's ``per_example_layer_norm_clip`` implements). Adaptive clipping is Andrew,
Thakkar, McMahan, Ramaswamy, "Differentially Private Learning with Adaptive Clipping", NeurIPS
2021, as apple/pfl-research does it in ``pfl/privacy/adaptive_clipping.py``.

A "layer" is one parameter tensor (each weight and each bias), as in the reference code.

Modes of :func:`clip_update` (each keeps the L2 sensitivity of one client's update at ``bound`` C,
so noise ``N(0, (z C)^2)`` on the sum gives the same guarantee whichever is used):

``flat``
    ``clip_grads``: if the total norm ``N < C`` the update is unchanged, else it is scaled by
    ``C / (N + 1e-6)``. Direction kept.
``per_layer``
    Independent per-layer clipping (McMahan et al. 2018): layer l is scaled by
    ``min(1, C_l / (n_l + 1e-6))`` whatever the other layers do, with ``sum_l C_l^2 = C^2``;
    ``allocation="uniform"`` gives ``C_l = C / sqrt(L)``, ``allocation="size"`` gives
    ``C_l = C sqrt(d_l / D)`` (``d_l`` entries in layer l, ``D`` in all), or pass ``layer_bounds``.
``per_layer_normalize``
    The paper's code, exactly: if the total norm ``N < C`` the update is unchanged; otherwise
    *every* layer is rescaled to norm ``C_l`` (``g_l / (n_l + 1e-10) * C_l``), small layers
    scaled up as well as large ones scaled down, so the total becomes C. With
    ``allocation="uniform"`` this is ``clip_layer_grads`` (``ConfigDP.clip_deltas_per_layer`` with
    ``use_uniform_per_layer_clip=True``); with ``"size"`` it is ``clip_layer_grads_params``.
``per_layer_dim``
    The name DESIGN.md gives the code's per-dimension variant: ``per_layer_normalize`` with
    ``allocation="size"``, i.e. exactly ``clip_layer_grads_params``
    (``use_uniform_per_layer_clip=False``).

Discrepancy between the paper's wording and its code: the paper speaks of "per-layer clipping"
(each layer clipped to its own bound), while the code's per-layer functions first test the
*total* norm and, when it exceeds C, *normalise* every layer to its bound — a layer-wise
normalisation of the update, not a clip of each layer. Both bound the total norm by C; they
differ in what happens to small layers and to updates whose total is under C but one layer is
over its C_l. ``per_layer`` is the textbook clip, ``per_layer_normalize``/``per_layer_dim`` the
code. The code's ``clip_layer_grads_params_w12``/``_power`` (architecture-specific hacks, unused
by ``train_pfl.py``) are not reproduced.

Noise: the reference server adds one standard deviation ``dp_sigma = C * sigma_DP`` to every
coordinate of the cohort *average*; here :func:`add_gaussian_noise` adds ``N(0, (z C)^2)`` to the
*sum*, and :func:`private_mean` divides by a fixed denominator afterwards, the same thing with
``sigma_DP = z / S`` for cohort size S.

Plain PyTorch; no Flower, Prefect or MLflow here — the Flower strategy wrapper calls these.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

Mode = Literal["flat", "per_layer", "per_layer_normalize", "per_layer_dim"]
Allocation = Literal["uniform", "size"]
MODES: tuple[str, ...] = ("flat", "per_layer", "per_layer_normalize", "per_layer_dim")

#: Denominator guards copied from the reference code: ``clip_grads`` uses 1e-6, the per-layer
#: normalisations 1e-10. Opacus' per-sample clipping uses 1e-6 too (``per_layer`` uses it).
FLAT_EPS = 1e-6
NORMALIZE_EPS = 1e-10


@dataclass(frozen=True)
class ClippedUpdate:
    """A clipped update and what it looked like before clipping (for logging and adaptive clipping).

    ``layer_norms`` and ``total_norm`` are *pre-clip* L2 norms; ``layer_bounds`` the C_l used
    (``None`` for ``flat``). ``within_bound`` is Andrew et al.'s indicator ``||update|| <= C``,
    the bit adaptive clipping counts.
    """

    update: list[Tensor]
    layer_norms: Tensor
    total_norm: float
    bound: float
    layer_bounds: Tensor | None

    @property
    def within_bound(self) -> bool:
        return self.total_norm <= self.bound


def layer_norms(update: Sequence[Tensor]) -> Tensor:
    """L2 norm of each layer (float64 on CPU, so the decisions do not depend on the dtype)."""
    if len(update) == 0:
        return torch.zeros(0, dtype=torch.float64)
    return torch.stack([torch.linalg.vector_norm(t.detach().double()) for t in update]).cpu()


def layer_bounds(update: Sequence[Tensor], bound: float, allocation: Allocation = "uniform") -> Tensor:
    """Per-layer bounds C_l with ``sum_l C_l^2 = C^2``: ``C / sqrt(L)`` or ``C sqrt(d_l / D)``.

    ``"size"`` makes ``C_l^2`` proportional to the layer's number of entries, the reference code's
    "per dimension" rule (``max_norm * sqrt(g.size) / sqrt(n_params)``).
    """
    _check_bound(bound)
    n = len(update)
    if n == 0:
        return torch.zeros(0, dtype=torch.float64)
    if allocation == "uniform":
        return torch.full((n,), bound / math.sqrt(n), dtype=torch.float64)
    if allocation == "size":
        sizes = torch.tensor([t.numel() for t in update], dtype=torch.float64)
        total = sizes.sum()
        if total == 0:
            raise ValueError("allocation='size' needs at least one non-empty layer")
        return bound * torch.sqrt(sizes / total)
    raise ValueError(f"allocation must be 'uniform' or 'size', got {allocation!r}")


def clip_update(
    update: Sequence[Tensor],
    bound: float,
    mode: Mode = "flat",
    layer_bounds: Sequence[float] | Tensor | None = None,
    allocation: Allocation | None = None,
) -> ClippedUpdate:
    """Clip one client's update (a list of per-parameter tensors) so its L2 norm is at most ``bound``.

    Returns new tensors (the input is not modified) with the pre-clip norms; see the module
    docstring for the modes. ``layer_bounds`` overrides ``allocation`` for ``per_layer`` and
    ``per_layer_normalize``; it must satisfy ``sum C_l^2 <= C^2``, or the noise calibrated to C
    would no longer cover one client's contribution.
    """
    _check_bound(bound)
    if mode not in MODES:
        raise ValueError(f"clip mode must be one of {MODES}, got {mode!r}")
    update = list(update)
    norms = layer_norms(update)
    total = float(torch.sqrt((norms**2).sum()))

    if mode == "flat":
        if layer_bounds is not None or allocation is not None:
            raise ValueError("mode 'flat' takes no layer_bounds or allocation")
        if total < bound:
            out = [t.clone() for t in update]
        else:
            scale = bound / (total + FLAT_EPS)
            out = [t * scale for t in update]
        return ClippedUpdate(out, norms, total, bound, None)

    if mode == "per_layer_dim":
        if layer_bounds is not None or allocation not in (None, "size"):
            raise ValueError("mode 'per_layer_dim' is per_layer_normalize with allocation='size'; "
                             "it takes no layer_bounds or other allocation")
        bounds = _layer_bounds_for(update, bound, None, "size")
    else:
        bounds = _layer_bounds_for(update, bound, layer_bounds, allocation or "uniform")

    if mode == "per_layer":
        factors = torch.clamp(bounds / (norms + FLAT_EPS), max=1.0)
        out = [t * float(f) if f < 1.0 else t.clone() for t, f in zip(update, factors)]
    else:  # per_layer_normalize / per_layer_dim: the reference code's rule
        if total < bound:
            out = [t.clone() for t in update]
        else:
            factors = bounds / (norms + NORMALIZE_EPS)
            out = [t * float(f) for t, f in zip(update, factors)]
    return ClippedUpdate(out, norms, total, bound, bounds)


def add_gaussian_noise(
    summed_update: Sequence[Tensor],
    noise_multiplier: float,
    bound: float,
    generator: torch.Generator | None = None,
) -> list[Tensor]:
    """Add ``N(0, (z C)^2)`` independently to every coordinate of the *sum* of clipped updates.

    Called once per round on the server, after summing; one client changes the sum by at most
    C in L2, so this is the Gaussian mechanism with noise multiplier z. ``generator`` must live on
    the tensors' device. torch's generators are not cryptographically secure and floating-point
    Gaussian sampling has known attacks (Mironov 2012): fine for research, not for deployment.
    """
    _check_bound(bound)
    if not noise_multiplier >= 0 or math.isinf(noise_multiplier):
        raise ValueError(f"noise_multiplier must be finite and >= 0, got {noise_multiplier}")
    std = noise_multiplier * bound
    if std == 0:
        return [t.clone() for t in summed_update]
    return [
        t + std * torch.randn(t.shape, generator=generator, device=t.device, dtype=t.dtype)
        for t in summed_update
    ]


def private_mean(
    clipped_updates: Sequence[Sequence[Tensor]],
    noise_multiplier: float,
    bound: float,
    denominator: float | None = None,
    generator: torch.Generator | None = None,
) -> list[Tensor]:
    """Sum the clipped updates, add noise once, divide by a fixed ``denominator``.

    The denominator should be the *expected* cohort size, not the number that replied: dividing
    by a data-dependent count would leak it (McMahan et al. 2018 use the fixed ``qN``). Noise on
    the mean is then ``z C / denominator`` per coordinate — the reference's ``dp_sigma``.
    """
    if len(clipped_updates) == 0:
        raise ValueError("private_mean needs at least one clipped update (to know the shapes)")
    summed = [torch.stack([u[i] for u in clipped_updates]).sum(0) for i in range(len(clipped_updates[0]))]
    noised = add_gaussian_noise(summed, noise_multiplier, bound, generator)
    d = float(denominator) if denominator is not None else float(len(clipped_updates))
    if d <= 0:
        raise ValueError(f"denominator must be > 0, got {d}")
    return [t / d for t in noised]


# ----------------------------------------------------------------------------- adaptive clipping


def adaptive_update_noise_multiplier(noise_multiplier: float, count_noise_std: float) -> float:
    """Noise multiplier left for the update when the clipped-count is noised too (Andrew et al., Thm 1).

    Releasing the noised count with std ``sigma_b`` (on the sum of ``b_i - 1/2``) and the update
    with multiplier ``z_delta`` costs as much as one Gaussian mechanism with
    ``z = (z_delta^-2 + (2 sigma_b)^-2)^-1/2``; so to spend the budget accounted for ``z``, use
    ``z_delta = (z^-2 - (2 sigma_b)^-2)^-1/2``. Needs ``2 sigma_b > z``. Andrew et al. suggest
    ``sigma_b = cohort / 20``; pfl-research ``0.1 * cohort``.
    """
    if noise_multiplier <= 0:
        raise ValueError(f"adaptive clipping needs noise_multiplier > 0, got {noise_multiplier}")
    if not 2 * count_noise_std > noise_multiplier:
        raise ValueError(f"count noise std {count_noise_std} too small: need 2*sigma_b > z = "
                         f"{noise_multiplier} to leave privacy budget for the update")
    return (noise_multiplier**-2 - (2 * count_noise_std) ** -2) ** -0.5


def noisy_unclipped_fraction(
    within_bound: Sequence[bool],
    expected_cohort_size: float,
    count_noise_std: float,
    generator: torch.Generator | None = None,
) -> float:
    """Andrew et al.'s ``b~``: the noised fraction of clients whose update norm was ``<= C``.

    ``(sum_i (b_i - 1/2) + N(0, sigma_b^2)) / m + 1/2``, with the fixed expected cohort size ``m``;
    centring ``b_i`` halves its sensitivity, which is where Theorem 1's ``2 sigma_b`` comes from.
    """
    if expected_cohort_size <= 0:
        raise ValueError(f"expected_cohort_size must be > 0, got {expected_cohort_size}")
    if count_noise_std < 0:
        raise ValueError(f"count_noise_std must be >= 0, got {count_noise_std}")
    centred = sum(float(b) - 0.5 for b in within_bound)
    noise = float(torch.randn((), generator=generator, dtype=torch.float64)) * count_noise_std
    return (centred + noise) / expected_cohort_size + 0.5


def update_clip_bound(
    bound: float, unclipped_fraction: float, target_quantile: float = 0.5, learning_rate: float = 0.2
) -> float:
    """Geometric update ``C <- C exp(-eta (b~ - gamma))`` (Andrew et al. 2021; pfl-research
    ``AdaptiveClippingGaussianMechanism._geometric_update``).

    Too many updates under the bound (``b~ > gamma``) shrinks C, too few grows it, so C tracks the
    ``gamma`` quantile of update norms. Defaults are the paper's (eta 0.2, gamma 0.5). Pure
    post-processing of the noised ``b~``: no privacy cost beyond releasing ``b~``.
    """
    _check_bound(bound)
    if not 0.0 <= target_quantile <= 1.0:
        raise ValueError(f"target_quantile must be in [0, 1], got {target_quantile}")
    if learning_rate < 0:
        raise ValueError(f"learning_rate must be >= 0, got {learning_rate}")
    return bound * math.exp(-learning_rate * (unclipped_fraction - target_quantile))


# ----------------------------------------------------------------------------- helpers


def _check_bound(bound: float) -> None:
    if not (bound > 0 and math.isfinite(bound)):
        raise ValueError(f"clipping bound must be finite and > 0, got {bound}")


def _layer_bounds_for(update, bound, explicit, allocation) -> Tensor:
    if explicit is None:
        return layer_bounds(update, bound, allocation)
    bounds = torch.as_tensor(explicit, dtype=torch.float64).flatten().cpu()
    if bounds.numel() != len(update):
        raise ValueError(f"layer_bounds has {bounds.numel()} entries for {len(update)} layers")
    if (bounds < 0).any():
        raise ValueError("layer_bounds must be >= 0")
    total = float(torch.sqrt((bounds**2).sum()))
    if total > bound * (1 + 1e-6):
        raise ValueError(f"layer_bounds give sqrt(sum C_l^2) = {total:.6g} > bound {bound:.6g}: "
                         "the noise calibrated to the bound would not cover one client's update")
    return bounds
