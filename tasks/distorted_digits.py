"""Harder digits, generated offline: 28×28 grey (``digits28``) and 32×32 colour (``digits32c``).

The embedded 8×8 digits are too easy to show what goes wrong on real image data (a CNN that
stops learning, a learning rate too large for the number of local steps): the defaults were
tuned on them. No data can be downloaded at run time, so these streams are made from the same
1,797 scanned digits, each drawn several times the way handwriting varies — upsampled into a
20×20 box of a 28×28 canvas as MNIST is, shifted, rotated and sheared a little, elastically
distorted (Simard et al., 2003: a smoothed random displacement field), its strokes thickened or
thinned, its contrast varied, with pixel noise. The colour variant draws each digit in a random
colour on a random background, 24×24 in a 32×32 canvas, as CIFAR-sized input.

The images are a fixed data set (drawn with a fixed generator, whatever the run's seed); the
run's seed only splits it into train and test, by *source* scan: every drawing of one scan is on
the same side of the split, so a test image is never a redrawing of a training image.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch
from torch.nn import functional as F

from lifelong.tasks.data import Arrays

#: How many drawings of each source scan: ~180 scans a class → ~720 images a class.
DRAWINGS_PER_SCAN = 4
_GENERATOR_SEED = 20261206


def load_distorted_digits(test_fraction: float, seed: int, colour: bool) -> Arrays:
    """The distorted digits split by source scan (stratified, seeded) into train and test."""
    from sklearn.model_selection import train_test_split

    x, y, source = _drawings(colour)
    scans = np.arange(int(source.max()) + 1)
    scan_labels = np.zeros(len(scans), dtype=np.int64)
    scan_labels[source.numpy()] = y.numpy()
    train_scans, _ = train_test_split(scans, test_size=test_fraction, random_state=seed, stratify=scan_labels)
    in_train = torch.from_numpy(np.isin(source.numpy(), train_scans))
    return Arrays(x[in_train], y[in_train], x[~in_train], y[~in_train])


@lru_cache(maxsize=2)
def _drawings(colour: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every drawing (N×C×H×W in [0, 1]), its class and the index of its source scan."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    scans = torch.from_numpy(digits.data.astype(np.float32) / 16.0).reshape(-1, 1, 8, 8)
    labels = torch.from_numpy(digits.target.astype(np.int64))
    gen = torch.Generator().manual_seed(_GENERATOR_SEED + int(colour))
    x = scans.repeat_interleave(DRAWINGS_PER_SCAN, 0)
    size, box = (32, 24) if colour else (28, 20)
    x = _place(x, size, box, gen)
    x = _elastic(x, alpha=size * 0.08, sigma=size * 0.2, gen=gen)
    x = _stroke_width(x, gen)
    x = _contrast_and_noise(x, gen)
    if colour:
        x = _colourise(x, gen)
    source = torch.arange(len(scans)).repeat_interleave(DRAWINGS_PER_SCAN)
    return x.contiguous(), labels.repeat_interleave(DRAWINGS_PER_SCAN), source


def _uniform(gen: torch.Generator, n: int, low: float, high: float) -> torch.Tensor:
    return low + (high - low) * torch.rand(n, generator=gen)


def _place(x: torch.Tensor, size: int, box: int, gen: torch.Generator) -> torch.Tensor:
    """Upsample each 8×8 scan into a ``box``-pixel square centred on a ``size`` canvas, then
    warp it: rotation (±15°), shear (±0.25), scale (±10%) and shift (±2 px), one per image."""
    n = len(x)
    angle = torch.deg2rad(_uniform(gen, n, -15, 15))
    cos, sin, shear = torch.cos(angle), torch.sin(angle), _uniform(gen, n, -0.25, 0.25)
    forward = torch.stack([torch.stack([cos, cos * shear - sin], 1),
                           torch.stack([sin, sin * shear + cos], 1)], 1)
    forward = forward * _uniform(gen, n, 0.9, 1.1).view(-1, 1, 1)
    shift = _uniform(gen, 2 * n, -2, 2).reshape(n, 2, 1) * 2 / size  # in grid units ([-1, 1])
    # grid_sample maps each output position to the input position it reads: the inverse warp.
    inverse = torch.linalg.inv(forward)
    theta = torch.cat([inverse, -inverse @ shift], 2)
    up = F.interpolate(x, size=(box, box), mode="bilinear", align_corners=False)
    canvas = F.pad(up, [(size - box) // 2] * 4)
    grid = F.affine_grid(theta, list(canvas.shape), align_corners=False)
    return F.grid_sample(canvas, grid, align_corners=False, padding_mode="zeros").clamp(0, 1)


def _elastic(x: torch.Tensor, alpha: float, sigma: float, gen: torch.Generator) -> torch.Tensor:
    """Simard et al.'s elastic distortion: a smooth random displacement field of at most
    ``alpha`` px, applied by bilinear resampling. The field is smoothed by drawing it on a coarse
    grid (one node every ``sigma`` px) and interpolating it bicubically, not by a Gaussian blur
    of a full-resolution field: as smooth, and 40× faster here."""
    n, _, h, w = x.shape
    coarse = torch.rand(n, 2, max(2, round(h / sigma)), max(2, round(w / sigma)), generator=gen) * 2 - 1
    field = F.interpolate(coarse, size=(h, w), mode="bicubic", align_corners=True) * alpha
    ys, xs = torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, w), indexing="ij")
    base = torch.stack([xs, ys], -1).expand(n, h, w, 2)
    grid = base + field.permute(0, 2, 3, 1) * torch.tensor([2 / w, 2 / h])
    return F.grid_sample(x, grid, align_corners=True, padding_mode="zeros")


def _stroke_width(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """A third of the drawings get thicker strokes (grey dilation), a third thinner (erosion)."""
    kind = torch.randint(0, 3, (len(x),), generator=gen)
    thick = F.max_pool2d(x, 3, stride=1, padding=1)
    thin = -F.max_pool2d(-x, 2, stride=1, padding=0)
    thin = F.pad(thin, (0, 1, 0, 1))
    pick = kind.view(-1, 1, 1, 1)
    return torch.where(pick == 1, thick, torch.where(pick == 2, torch.maximum(thin, 0.5 * x), x))


def _contrast_and_noise(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    n = len(x)
    ink = _uniform(gen, n, 0.55, 1.0).view(-1, 1, 1, 1)
    paper = _uniform(gen, n, 0.0, 0.2).view(-1, 1, 1, 1)
    noise = torch.randn(x.shape, generator=gen) * _uniform(gen, n, 0.03, 0.12).view(-1, 1, 1, 1)
    return (paper + (ink - paper) * x + noise).clamp(0, 1)


def _colourise(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Ink and paper each get a random RGB colour, the ink at least 0.35 away in brightness."""
    n = len(x)
    paper = torch.rand(n, 3, generator=gen)
    ink = torch.rand(n, 3, generator=gen)
    gap = ink.mean(1) - paper.mean(1)
    push = (0.35 - gap.abs()).clamp_min(0) * torch.where(gap >= 0, 1.0, -1.0)
    ink = (ink + push[:, None]).clamp(0, 1)
    paper = (paper - push[:, None]).clamp(0, 1)
    return paper[:, :, None, None] + (ink - paper)[:, :, None, None] * x
