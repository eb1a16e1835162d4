"""Multi-task problems: one shared backbone, several heads, several losses on the same inputs.

On the embedded 8×8 digits:

* ``digits_attributes`` — digit class (10-way), parity (2-way), magnitude ``>= 5`` (2-way);
* ``digits_recon`` — digit class and reconstruction of the input (the paper's self-supervised
  setting at small scale): classification wants features invariant to the details that
  reconstruction must keep, so their gradients on the shared backbone genuinely conflict;
* ``digits_all`` — the four tasks together (for scaling with the number of tasks).

Bring-your-own: an .npz with ``x`` and one ``y_<name>`` array of class ids per task.
Reconstruction uses ``0.85 * (1 - SSIM) / 2 + 0.15 * L1`` (the photometric loss GCond's paper
uses), with SSIM over 3×3 windows.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import Tensor, nn

from lifelong.config import MULTITASK_PROBLEMS
from lifelong.tasks.data import DatasetError, load_digits
from lifelong.tasks.models import cnn_backbone, mlp_backbone


@dataclass(frozen=True)
class TaskSpec:
    name: str
    kind: str  # "classification" | "reconstruction"
    out_dim: int


@dataclass
class MultiTaskData:
    name: str
    tasks: list[TaskSpec]
    x_train: Tensor
    y_train: dict[str, Tensor]
    x_test: Tensor
    y_test: dict[str, Tensor]

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])


PROBLEMS = MULTITASK_PROBLEMS


def _digit_targets(y: Tensor, x: Tensor, names) -> dict[str, Tensor]:
    make = {
        "class": lambda: y,
        "parity": lambda: y % 2,
        "magnitude": lambda: (y >= 5).long(),
        "reconstruction": lambda: x,
    }
    return {n: make[n]() for n in names}


def load_problem(name: str, test_fraction: float, seed: int, path: Path | None = None,
                 tasks: list[str] | None = None) -> MultiTaskData:
    if name == "npz":
        return _load_npz(path, test_fraction, seed, tasks)
    if name not in PROBLEMS:
        raise DatasetError(f"multitask.problem: unknown {name!r}; allowed: {', '.join([*PROBLEMS, 'npz'])}")
    names = list(tasks or PROBLEMS[name])
    a = load_digits(test_fraction, seed)
    specs = [TaskSpec(n, "reconstruction" if n == "reconstruction" else "classification",
                      64 if n == "reconstruction" else (10 if n == "class" else 2)) for n in names]
    return MultiTaskData(name, specs, a.x_train, _digit_targets(a.y_train, a.x_train, names),
                         a.x_test, _digit_targets(a.y_test, a.x_test, names))


def _load_npz(path: Path | None, test_fraction: float, seed: int, tasks: list[str] | None) -> MultiTaskData:
    if path is None or not Path(path).is_file():
        raise DatasetError(f"multitask.path: npz file not found: {path}")
    with np.load(path) as f:
        files = dict(f)
    if "x" not in files:
        raise DatasetError(f"{path}: missing array 'x'")
    label_keys = sorted(k for k in files if k.startswith("y_"))
    names = tasks or [k[2:] for k in label_keys]
    missing = [n for n in names if f"y_{n}" not in files]
    if not names or missing:
        raise DatasetError(f"{path}: needs one y_<task> array per task (found {label_keys}, missing {missing})")
    x = torch.from_numpy(files["x"].astype(np.float32))
    if x.dim() == 3:
        x = x[:, None]
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(x), generator=g)
    n_test = max(1, int(len(x) * test_fraction))
    te, tr = perm[:n_test], perm[n_test:]
    ys = {n: torch.from_numpy(files[f"y_{n}"].astype(np.int64)) for n in names}
    for n, y in ys.items():
        if len(y) != len(x):
            raise DatasetError(f"{path}: y_{n} has {len(y)} rows but x has {len(x)}")
    specs = [TaskSpec(n, "classification", int(ys[n].max()) + 1) for n in names]
    return MultiTaskData("npz", specs, x[tr], {n: y[tr] for n, y in ys.items()}, x[te],
                         {n: y[te] for n, y in ys.items()})


class MultiTaskNet(nn.Module):
    """A shared backbone with one head per task (a linear classifier, or a decoder to pixels)."""

    def __init__(self, input_shape: tuple[int, ...], tasks: list[TaskSpec], backbone: str = "mlp",
                 hidden: int = 128):
        super().__init__()
        if backbone == "cnn":
            self.backbone = cnn_backbone(input_shape, (16, 32), hidden, 0.0)
        else:
            self.backbone = mlp_backbone(input_shape, hidden, 0.0)
        self.input_shape = input_shape
        heads = {}
        for t in tasks:
            if t.kind == "reconstruction":
                heads[t.name] = nn.Sequential(nn.Linear(hidden, int(np.prod(input_shape))), nn.Sigmoid())
            else:
                heads[t.name] = nn.Linear(hidden, t.out_dim)
        self.heads = nn.ModuleDict(heads)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        z = self.backbone(x)
        return {name: head(z) for name, head in self.heads.items()}

    def shared_parameters(self) -> list[nn.Parameter]:
        return list(self.backbone.parameters())


def ssim(a: Tensor, b: Tensor, c1: float = 0.01 ** 2, c2: float = 0.03 ** 2) -> Tensor:
    """Mean structural similarity over 3×3 windows (images in [0, 1], N×C×H×W)."""
    pool = lambda t: nn.functional.avg_pool2d(t, 3, 1, padding=1)  # noqa: E731
    mu_a, mu_b = pool(a), pool(b)
    var_a = pool(a * a) - mu_a ** 2
    var_b = pool(b * b) - mu_b ** 2
    cov = pool(a * b) - mu_a * mu_b
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2))
    return s.mean()


def reconstruction_loss(pred: Tensor, target: Tensor) -> Tensor:
    pred = pred.view_as(target)
    return 0.85 * (1 - ssim(pred, target)) / 2 + 0.15 * (pred - target).abs().mean()


def task_loss(spec: TaskSpec) -> Callable[[Tensor, Tensor], Tensor]:
    if spec.kind == "reconstruction":
        return reconstruction_loss
    return nn.functional.cross_entropy


@torch.no_grad()
def evaluate_tasks(model: MultiTaskNet, data: MultiTaskData, batch_size: int = 1024) -> dict[str, float]:
    """Test metric per task: accuracy for classification, SSIM for reconstruction (higher is better)."""
    was = model.training
    model.eval()
    out: dict[str, list] = {t.name: [] for t in data.tasks}
    for i in range(0, len(data.x_test), batch_size):
        preds = model(data.x_test[i : i + batch_size])
        for t in data.tasks:
            y = data.y_test[t.name][i : i + batch_size]
            if t.kind == "reconstruction":
                out[t.name].append((float(ssim(preds[t.name].view_as(y), y)), len(y)))
            else:
                out[t.name].append((float((preds[t.name].argmax(1) == y).float().mean()), len(y)))
    model.train(was)
    return {f"{t.name}/{'ssim' if t.kind == 'reconstruction' else 'accuracy'}":
            sum(v * n for v, n in out[t.name]) / sum(n for _, n in out[t.name]) for t in data.tasks}
