"""Gradient inversion against one client's update: how much of its training data the update leaks.

Zhu, Liu, Han, "Deep Leakage from Gradients", NeurIPS 2019 (DLG): optimise dummy inputs and soft
labels so that the gradient they produce at the shared model matches the observed one, with
L-BFGS on the squared L2 distance between the gradients. Zhao, Mopuri, Bilen, "iDLG: Improved Deep
Leakage from Gradients", arXiv 2001.02610 (2020): with cross-entropy the true label is read off
the last layer's gradient first (its row for the true class is the only one with a negative
sign), and only the inputs are optimised. The cosine distance (and Adam) are Geiping, Bauermeister,
Dröge, Moeller, "Inverting Gradients — How easy is it to break privacy in federated learning?",
NeurIPS 2020, which also shows that a fully connected first layer gives the input in closed form
(:func:`closed_form_input`; Phong et al. 2017).

Threat model (the one the papers use, the strongest honest-but-curious server): the attacker
knows the global model the client started from, the client's loss (cross-entropy), its learning
rate, and sees the client's update. With one local step of plain SGD on a batch ``(x, y)`` the
update is ``-lr * grad L(x, y)``, so the attacker divides by ``-lr`` and matches gradients. Several
local steps, momentum or large batches make the attack much harder; the audit deliberately uses
DLG's regime (1-4 samples, one step) so that its "no DP" result is a real leak, not a strawman.

Label inference for batches of more than one sample extends iDLG's sign rule as in Wainakh et
al., "User-Level Label Leakage from Gradients in Federated Learning", PETS 2022: the head's bias
gradient is ``mean_b(p_b) - k/N`` (``k`` the label counts), so ``k ≈ N (p̄ - g)`` with ``p̄``
estimated from the model's predictions on random inputs; a clipped update only scales ``g``, and
the scale is estimated from the classes whose entry is positive (absent classes, ``g = s p̄``).

Plain PyTorch: no MLflow, Prefect or Flower here (``flows/privacy_audit.py`` runs and logs an audit).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

Distance = Literal["l2", "cosine"]
LabelMode = Literal["idlg", "dlg"]
Optim = Literal["lbfgs", "adam"]


# ----------------------------------------------------------------------------- scores


def psnr(mse: float, peak: float = 1.0) -> float:
    """Peak signal-to-noise ratio in dB, ``10 log10(peak^2 / MSE)`` (inf for a perfect copy)."""
    if mse <= 0:
        return math.inf
    return 10.0 * math.log10(peak**2 / mse)


@dataclass(frozen=True)
class Score:
    """Reconstruction error after pairing every reconstruction with the true sample it is closest to.

    DLG cannot know the order of the batch, so the pairing (Hungarian, on per-sample MSE) is part
    of the score, as in the papers' evaluations. ``order[i]`` is the reconstruction paired with
    true sample ``i``; ``per_sample_mse`` follows the true samples' order.
    """

    mse: float
    psnr: float
    label_accuracy: float
    per_sample_mse: list[float]
    order: list[int]


def score(x_true: Tensor, y_true: Tensor, x_rec: Tensor, y_rec: Tensor, peak: float = 1.0) -> Score:
    """MSE, PSNR (of the mean MSE) and label accuracy of a reconstruction, after matching."""
    from scipy.optimize import linear_sum_assignment

    if x_true.shape != x_rec.shape:
        raise ValueError(f"shapes differ: true {tuple(x_true.shape)} vs reconstructed {tuple(x_rec.shape)}")
    n = len(x_true)
    cost = ((x_true.reshape(n, 1, -1) - x_rec.reshape(1, n, -1)) ** 2).mean(-1).double()
    rows, cols = linear_sum_assignment(cost.numpy())
    order = [int(c) for _, c in sorted(zip(rows, cols))]
    per = [float(cost[i, order[i]]) for i in range(n)]
    mse = sum(per) / n
    acc = float((y_rec[order] == y_true).double().mean())
    return Score(mse, psnr(mse, peak), acc, per, order)


# ----------------------------------------------------------------------------- gradients


def batch_gradient(model: nn.Module, x: Tensor, y: Tensor, create_graph: bool = False) -> list[Tensor]:
    """Gradient of the mean cross-entropy at ``(x, y)`` for every parameter of ``model``.

    ``y`` is hard labels (N,) or soft label distributions (N, C) (DLG's optimised labels).
    """
    out = model(x)
    if y.dim() == 1:
        loss = F.cross_entropy(out, y)
    else:
        loss = torch.sum(-y * F.log_softmax(out, dim=-1), dim=-1).mean()
    params = [p for p in model.parameters() if p.requires_grad]
    return list(torch.autograd.grad(loss, params, create_graph=create_graph))


def sgd_update(model: nn.Module, x: Tensor, y: Tensor, lr: float) -> list[Tensor]:
    """The update one step of plain SGD on the batch sends: ``-lr * grad`` (per parameter)."""
    return [-lr * g.detach() for g in batch_gradient(model, x, y)]


def update_to_gradient(update: Sequence[Tensor], lr: float) -> list[Tensor]:
    """What the attacker matches: the gradient a one-step SGD update implies, ``-update / lr``."""
    if not lr > 0:
        raise ValueError(f"the client's learning rate must be > 0, got {lr}")
    return [-u / lr for u in update]


def gradient_distance(dummy: Sequence[Tensor], observed: Sequence[Tensor], kind: Distance = "l2") -> Tensor:
    """DLG's squared L2 distance, or Geiping et al.'s ``1 - cos`` over all parameters at once.

    The cosine ignores the update's scale, so it still matches an update that clipping shrank.
    """
    if kind == "l2":
        return sum(((d - o) ** 2).sum() for d, o in zip(dummy, observed))
    if kind == "cosine":
        dot = sum((d * o).sum() for d, o in zip(dummy, observed))
        nd = torch.sqrt(sum((d**2).sum() for d in dummy))
        no = torch.sqrt(sum((o**2).sum() for o in observed))
        return 1 - dot / (nd * no + 1e-12)
    raise ValueError(f"distance must be 'l2' or 'cosine', got {kind!r}")


# ----------------------------------------------------------------------------- closed forms


def closed_form_input(weight_grad: Tensor, bias_grad: Tensor) -> Tensor:
    """The input of a fully connected layer ``W x + b`` from its gradients, for one sample.

    ``dL/dW = delta x^T`` and ``dL/db = delta``, so every row with ``delta_j != 0`` gives
    ``x = dL/dW_j / dL/db_j``; the row with the largest ``|delta_j|`` is the best conditioned.
    """
    j = int(torch.argmax(bias_grad.abs()))
    if float(bias_grad[j].abs()) == 0.0:
        raise ValueError("the bias gradient is zero: this layer's gradient holds no trace of the input")
    return weight_grad[j] / bias_grad[j]


def idlg_label(head_weight_grad: Tensor) -> int:
    """iDLG: the true class of a single sample from the last layer's weight gradient.

    Row ``c`` of ``dL/dW`` is ``(p_c - y_c) h`` with non-negative features ``h`` (after a ReLU):
    only the true class has ``p_c - 1 < 0``, so its row sum is the only negative one.
    """
    return int(torch.argmin(head_weight_grad.sum(dim=1)))


def infer_labels(head_bias_grad: Tensor, n: int, mean_probs: Tensor) -> Tensor:
    """Labels of an ``n``-sample batch from the head's bias gradient (iDLG for n=1, counts for n>1).

    ``g_c = p̄_c - k_c / n``: classes with a negative entry are present. The counts are
    ``n (p̄_c - g_c / s)``, where ``s`` (the update's unknown scale after clipping) is estimated
    from the positive entries, ``g_c = s p̄_c`` for the absent classes; they are rounded by largest
    remainder to sum to ``n``, every present class getting at least one.
    """
    g = head_bias_grad.detach().double().flatten()
    p = mean_probs.detach().double().flatten()
    if n == 1:
        return torch.tensor([int(torch.argmin(g))])
    positive = g > 0
    s = float(torch.median(g[positive] / p[positive].clamp_min(1e-12))) if positive.any() else 1.0
    s = s if s > 0 else 1.0
    present = torch.nonzero(g < 0).flatten().tolist() or [int(torch.argmin(g))]
    present = sorted(present, key=lambda c: float(g[c]))[:n]  # most negative first
    raw = {c: max(float(n * (p[c] - g[c] / s)), 1.0) for c in present}
    total = sum(raw.values())
    share = {c: v * n / total for c, v in raw.items()}
    counts = {c: max(1, math.floor(v)) for c, v in share.items()}
    while sum(counts.values()) > n:  # floors of >=1 can overshoot
        c = max(counts, key=lambda k: counts[k] - share[k])
        counts[c] -= 1
    for c in sorted(share, key=lambda k: share[k] - counts[k], reverse=True):
        if sum(counts.values()) >= n:
            break
        counts[c] += 1
    return torch.tensor(sorted(c for c, k in counts.items() for _ in range(k)))


# ----------------------------------------------------------------------------- the attack


@dataclass
class Reconstruction:
    x: Tensor
    y: Tensor
    distance: float
    history: list[float]


def invert(
    model: nn.Module,
    observed: Sequence[Tensor],
    n: int,
    input_shape: tuple[int, ...],
    n_classes: int,
    *,
    labels: LabelMode = "idlg",
    distance: Distance = "cosine",
    optimizer: Optim = "adam",
    iterations: int = 300,
    lr: float | None = None,
    bounds: tuple[float, float] | None = (0.0, 1.0),
    generator: torch.Generator | None = None,
    callback: Callable[[int, float], None] | None = None,
) -> Reconstruction:
    """Optimise ``n`` dummy inputs so that their gradient at ``model`` matches ``observed``.

    ``labels="idlg"`` reads the labels off the head's gradient first (:func:`infer_labels`) and
    optimises inputs only; ``"dlg"`` optimises soft labels jointly, as DLG does. The defaults
    (cosine distance, Adam) are Geiping et al.'s: on the project's ReLU models they reconstruct
    better and an order of magnitude faster than DLG's L2 + L-BFGS (``distance="l2",
    optimizer="lbfgs"``, whose line search costs ~10 gradient evaluations a step), and the
    cosine still matches a clipped (rescaled) update — the attacker's best choice against DP.
    DLG's L-BFGS on ReLU networks often stalls far from the input (DLG used sigmoids). ``bounds`` is
    the data range the attacker assumes (pixels in [0, 1]): the dummy is clamped into it after
    each Adam step (projected gradient) and, with L-BFGS, at the end only (moving the iterate
    behind L-BFGS's back corrupts its curvature history and stalls it). ``observed`` follows ``model.parameters()``. ``callback(i, d)`` is
    called every step with the gradient distance (progress output).
    """
    if n < 1:
        raise ValueError(f"the batch to reconstruct needs at least one sample, got {n}")
    params = [p for p in model.parameters() if p.requires_grad]
    if len(params) != len(observed):
        raise ValueError(f"observed gradient has {len(observed)} tensors, the model {len(params)} parameters")
    observed = [o.detach() for o in observed]
    dummy_x = torch.rand((n, *input_shape), generator=generator).requires_grad_(True)
    if labels == "idlg":
        with torch.no_grad():
            probe = torch.rand((64, *input_shape), generator=generator)
            mean_probs = F.softmax(model(probe), dim=-1).mean(0)
        y = infer_labels(observed[-1], n, mean_probs)
        variables, target = [dummy_x], y
    elif labels == "dlg":
        dummy_y = torch.randn((n, n_classes), generator=generator).requires_grad_(True)
        variables, target = [dummy_x, dummy_y], None
    else:
        raise ValueError(f"labels must be 'idlg' or 'dlg', got {labels!r}")

    if optimizer == "lbfgs":
        # Tolerances 0: the distance and its gradient are tiny (~1e-6) from the start, and the
        # defaults (1e-7, 1e-9) would end the run at step 1.
        opt = torch.optim.LBFGS(variables, lr=lr or 1.0, max_iter=1, history_size=100, tolerance_grad=0.0,
                                tolerance_change=0.0,
                                line_search_fn="strong_wolfe")
    elif optimizer == "adam":
        opt = torch.optim.Adam(variables, lr=lr or 0.1)
    else:
        raise ValueError(f"optimizer must be 'lbfgs' or 'adam', got {optimizer!r}")

    # Geiping et al.'s step decay (x0.1 at 3/8, 5/8, 7/8 of the run): Adam settles instead of
    # circling the optimum. L-BFGS's line search sets its own steps.
    milestones = [int(iterations * f) for f in (3 / 8, 5 / 8, 7 / 8)]
    schedule = torch.optim.lr_scheduler.MultiStepLR(opt, milestones, 0.1) if optimizer == "adam" else None

    def closure():
        opt.zero_grad()
        y_used = target if target is not None else F.softmax(dummy_y, dim=-1)
        d = gradient_distance(batch_gradient(model, dummy_x, y_used, create_graph=True), observed, distance)
        d.backward()
        return d

    history: list[float] = []
    for i in range(iterations):
        d = float(opt.step(closure).detach())
        if bounds is not None and optimizer == "adam":  # L-BFGS's curvature pairs break if moved
            with torch.no_grad():
                dummy_x.clamp_(*bounds)
        if schedule is not None:
            schedule.step()
        history.append(d)
        if callback is not None:
            callback(i, d)
        if not math.isfinite(d):
            break
    x = dummy_x.detach()
    if bounds is not None:
        x = x.clamp(*bounds)
    y_out = target if target is not None else dummy_y.detach().argmax(-1)
    return Reconstruction(x, y_out.clone(), history[-1] if history else math.nan, history)


# ----------------------------------------------------------------------------- what the server sees


def private_view(
    update: Sequence[Tensor],
    mode: str,
    clip: float,
    noise_multiplier: float,
    allocation: str = "uniform",
    generator: torch.Generator | None = None,
) -> list[Tensor]:
    """One client's update as user-level DP lets the server see it, in the best case for the attacker.

    The update is clipped exactly as ``bridges/flower/dp_fedavg.py`` clips it (``clip_update`` with
    the config's mode, bound and allocation) and gets the noise the server adds to the *sum*,
    ``N(0, (z C)^2)`` per coordinate — as if this client were alone in the sum. In a real round
    the server sees only the noised sum of the whole cohort (divided by its expected size), so
    the attacker there has strictly less; this is the single client's contribution with exactly
    the noise that protects it.
    """
    from lifelong.privacy.clipping import add_gaussian_noise, clip_update

    alloc = allocation if mode in ("per_layer", "per_layer_normalize") else None
    clipped = clip_update(list(update), clip, mode, allocation=alloc).update
    return add_gaussian_noise(clipped, noise_multiplier, clip, generator=generator)
