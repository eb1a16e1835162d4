"""Input standardisation: per-channel statistics of a stream's training split, and the layer
that applies them as every model's first step.

Unscaled inputs (pixels in [0, 1], mean ≈ 0.2 on the digits) shift every first-layer
pre-activation the same way and, with a large learning rate, push ReLUs into the dead range.
The statistics are computed once per stream, over the training split only (never the test
split), and recorded with the run; the layer keeps them as buffers, so a registered model
carries its own scaling to whoever loads it.
"""

from __future__ import annotations

import torch
from torch import nn

#: A channel whose standard deviation is below this is only centred (a constant border pixel of
#: flat features would otherwise be divided by zero).
MIN_STD = 1e-3


def channel_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and standard deviation per channel of N×C×H×W images (per feature of N×D rows)."""
    dims = (0,) if x.dim() == 2 else (0, *range(2, x.dim()))
    x = x.double()  # a float32 sum over millions of pixels loses digits
    mean, std = x.mean(dims), x.std(dims)
    return mean.float(), std.clamp_min(MIN_STD).float()


class Standardize(nn.Module):
    """``(x - mean) / std`` per channel (per feature for flat input); identity without statistics.

    Buffers, not parameters: no optimiser or regulariser touches them, and FedAvg averages
    identical copies to themselves.
    """

    def __init__(self, input_shape: tuple[int, ...], stats: tuple[torch.Tensor, torch.Tensor] | None = None):
        super().__init__()
        view = (-1, *([1] * (len(input_shape) - 1)))
        mean, std = stats if stats is not None else (torch.zeros(input_shape[0]), torch.ones(input_shape[0]))
        self.register_buffer("mean", torch.as_tensor(mean, dtype=torch.float32).reshape(view).clone())
        self.register_buffer("std", torch.as_tensor(std, dtype=torch.float32).reshape(view).clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


def stats_params(stats: tuple[torch.Tensor, torch.Tensor] | None) -> dict[str, str]:
    """The statistics as run parameters (``stream.input_mean``, ``stream.input_std``; rounded)."""
    if stats is None:
        return {}
    text = {f"stream.input_{name}": ",".join(f"{v:.4g}" for v in t.flatten().tolist())
            for name, t in zip(("mean", "std"), stats)}
    # MLflow keeps parameter values up to 6,000 characters: flat features with many columns are cut
    return {k: v if len(v) <= 6000 else v[:5990] + ",…" for k, v in text.items()}
