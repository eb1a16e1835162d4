"""Staleness-weighted asynchronous aggregation: FedAsync's mixing weight and FedBuff's buffered step.

* FedAsync — Xie, Koyejo & Gupta, "Asynchronous Federated Optimization" (OPT 2020,
  arXiv 1903.03934), Algorithm 1: the server mixes each arriving model at once,
  ``x_t = (1 - alpha_t) x_{t-1} + alpha_t x_new`` with ``alpha_t = alpha * s(t - tau)``, where
  ``tau`` is the server version the client started from and ``s`` one of the paper's staleness
  functions (§5.2): constant ``s = 1``; polynomial ``s_a(t - tau) = (t - tau + 1)^(-a)``; hinge
  ``s_{a,b}(t - tau) = 1`` if ``t - tau <= b`` else ``1 / (a (t - tau - b) + 1)``.
* FedBuff — Nguyen et al., "Federated Learning with Buffered Asynchronous Aggregation"
  (AISTATS 2022, arXiv 2106.06639), Algorithm 1: clients' deltas ``Delta_i = x_i - x_{tau_i}``
  enter a buffer; when it holds ``K`` the server steps
  ``x <- x + eta_g * (1/K) * sum_i s(staleness_i) Delta_i`` with the paper's staleness scaling
  ``s(tau) = 1 / sqrt(1 + tau)`` (§3, following FedAsync's polynomial form with a = 1/2).

Plain PyTorch on state dicts of float tensors; the event loop that calls these is
``flows/virtual_clock.py``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor


def staleness_weight(staleness: int, kind: str = "polynomial", a: float = 0.5, b: int = 4) -> float:
    """FedAsync's ``s(t - tau)`` (Xie et al. §5.2)."""
    if staleness < 0:
        raise ValueError(f"staleness is a count of server versions, >= 0; got {staleness}")
    if a <= 0 and kind != "constant":
        raise ValueError(f"staleness exponent/slope a must be > 0, got {a}")
    if kind == "constant":
        return 1.0
    if kind == "polynomial":
        return float((staleness + 1) ** (-a))
    if kind == "hinge":
        return 1.0 if staleness <= b else 1.0 / (a * (staleness - b) + 1.0)
    raise ValueError(f"unknown staleness function {kind!r}; one of constant, polynomial, hinge")


def fedbuff_scale(staleness: int) -> float:
    """FedBuff's ``1 / sqrt(1 + staleness)`` (Nguyen et al. §3)."""
    if staleness < 0:
        raise ValueError(f"staleness is a count of server versions, >= 0; got {staleness}")
    return 1.0 / (1.0 + staleness) ** 0.5


def fedasync_mix(server: Mapping[str, Tensor], client: Mapping[str, Tensor], alpha: float,
                 staleness: int, kind: str = "polynomial", a: float = 0.5, b: int = 4) -> dict[str, Tensor]:
    """``(1 - alpha_t) server + alpha_t client`` on the float tensors (others keep the server's)."""
    if not 0 < alpha <= 1:
        raise ValueError(f"FedAsync's alpha must be in (0, 1], got {alpha}")
    w = alpha * staleness_weight(staleness, kind, a, b)
    return {k: ((1 - w) * v + w * client[k].to(v.dtype)) if v.is_floating_point() else v for k, v in server.items()}


def fedbuff_step(server: Mapping[str, Tensor], deltas: Sequence[Mapping[str, Tensor]], stalenesses: Sequence[int],
                 server_lr: float = 1.0) -> dict[str, Tensor]:
    """``server + eta_g * mean_i(s(staleness_i) * Delta_i)`` on the float tensors."""
    if len(deltas) == 0 or len(deltas) != len(stalenesses):
        raise ValueError("fedbuff_step needs one staleness per delta, and at least one delta")
    scales = [fedbuff_scale(s) for s in stalenesses]
    out = {}
    for k, v in server.items():
        if not v.is_floating_point():
            out[k] = v
            continue
        step = torch.stack([s * d[k].to(torch.float32) for s, d in zip(scales, deltas)]).mean(0)
        out[k] = (v.float() + server_lr * step).to(v.dtype)
    return out
