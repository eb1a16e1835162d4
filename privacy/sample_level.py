"""Sample-level DP-SGD's settings, plain: the mechanism's parameters, one bound per layer, and
what an experience reports. DP-SGD is Abadi et al., "Deep Learning with Differential Privacy",
CCS 2016; per-layer bounds (``sum_l C_l^2 = C^2``) are McMahan et al., ICLR 2018, allocated as
``privacy/clipping.py`` does for federated clipping. Opacus runs it: the Avalanche plugin is
``bridges/avalanche/sample_dp.py``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

from torch import Tensor

from lifelong.privacy.clipping import layer_bounds

Clipping = Literal["flat", "per_layer"]
GradSampleMode = Literal["hooks", "ghost"]

class SampleDPError(ValueError):
    """A combination that sample-level DP cannot keep its guarantee with."""


@dataclass(frozen=True)
class SampleDPConfig:
    noise_multiplier: float
    max_grad_norm: float
    clipping: Clipping = "flat"
    #: per-layer bounds: "uniform" (C / sqrt(L)), "size" (C sqrt(d_l / D)) or an explicit list.
    layer_bounds: Literal["uniform", "size"] | tuple[float, ...] = "uniform"
    grad_sample_mode: GradSampleMode = "hooks"
    accountant: Literal["rdp", "prv"] = "rdp"
    delta: float = 1e-5
    wrap_model: bool = False
    seed: int | None = None  # a noise generator seed, for tests; None = Opacus' default RNG

    def __post_init__(self):
        if self.noise_multiplier < 0 or self.max_grad_norm <= 0:
            raise SampleDPError(f"sample DP needs noise_multiplier >= 0 and max_grad_norm > 0, "
                                f"got {self.noise_multiplier}, {self.max_grad_norm}")
        if self.clipping not in ("flat", "per_layer"):
            raise SampleDPError(f"sample DP clipping must be 'flat' or 'per_layer', got {self.clipping!r}")
        if self.grad_sample_mode == "ghost" and self.clipping != "flat":
            raise SampleDPError("ghost clipping supports only clipping='flat' in Opacus 1.6")
        if not 0 < self.delta < 1:
            raise SampleDPError(f"sample DP delta must be in (0, 1), got {self.delta}")


@dataclass
class ExperienceReport:
    experience: int
    sample_rate: float
    steps: int
    epsilon: float  # composed over every experience so far
    epsilon_experience: float  # this experience alone
    delta: float
    history: list = field(default_factory=list)


def per_layer_bounds(params: Sequence[Tensor], cfg: SampleDPConfig) -> list[float]:
    """One bound per trainable parameter tensor, ``sum C_l^2 = C^2`` for the named allocations."""
    if isinstance(cfg.layer_bounds, str):
        return [float(b) for b in layer_bounds(list(params), cfg.max_grad_norm, cfg.layer_bounds)]
    bounds = [float(b) for b in cfg.layer_bounds]
    if len(bounds) != len(params):
        raise SampleDPError(f"per-layer clipping needs one bound per trainable tensor: "
                            f"{len(params)} tensors, {len(bounds)} bounds")
    return bounds


