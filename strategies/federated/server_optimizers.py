"""The server's optimizer step: the round's averaged update is the (negative) pseudo-gradient.

Reddi, Charles, Zaheer, Garrett, Rush, Konečný, Kumar, McMahan, "Adaptive Federated Optimization",
ICLR 2021 (Algorithm 1/2): with the global weights x and the aggregate (FedAvg's mean, or the DP
wrapper's clipped and noised mean) the server forms ``Delta = aggregate - x`` and steps with
``-Delta`` as the gradient. Pelikan et al. (arXiv 2310.00098, reference code
apple-aiml-research/ml-pfl4asr, ``pfl4asr/pfl/server.py`` ``Server.step``; see PAPERS.md) do the
same after adding DP noise, and get their layer-wise normalisation from LAMB's per-layer trust
ratio, with LARS and Adam as alternatives. A "layer" is one parameter tensor, as in
``privacy/clipping.py``; non-float tensors (counters) take the aggregate's value.

``fedavg``
    ``x + lr * Delta``. ``lr = 1`` is plain FedAvg and returns the aggregate itself, bit for bit.
``fedadam``
    Reddi et al.'s Algorithm 2 (Adam): ``m = b1 m + (1-b1) Delta``, ``v = b2 v + (1-b2) Delta^2``,
    ``x + lr m / (sqrt(v) + tau)``. Flower 1.42's ``flwr.serverapp.strategy.FedAdam`` departs from
    the paper: it multiplies lr by Kingma & Ba's bias correction with exponent ``server_round + 1``
    of its per-``start()`` round counter (which restarts at every experience in our flow), and it
    steps integer buffers too; so it is not reused — this is the paper's update, no bias correction.
``lamb``
    You, Li, Reddi, Hseu, Kumar, Bhojanapalli, Song, Demmel, Keutzer, Hsieh, "Large Batch
    Optimization for Deep Learning: Training BERT in 76 minutes", ICLR 2020, Algorithm 2 with
    g = -Delta: Adam moments with bias correction, ``r = m^ / (sqrt(v^) + eps)``,
    ``u = r + wd x``, and per layer ``x_l - lr * ||x_l|| / ||u_l|| * u_l`` (phi = identity).
``lars``
    You, Gitman, Ginsburg, "Large Batch Training of Convolutional Networks", arXiv 1708.03888,
    Algorithm 1 with g = -Delta: per layer ``local = ||x_l|| / (||g_l|| + wd ||x_l||)``,
    ``v_l = mu v_l + lr * local * (g_l + wd x_l)``, ``x_l - v_l``. The paper's trust
    coefficient eta multiplies the global lr gamma; here ``lr`` is their product.

Zero norms (LAMB and LARS), the convention of the usual implementations: the trust ratio is 1
when the layer's weights or its step have norm 0 (a zero-initialised bias still moves; a zero
step stays zero). torch.optim has Adam but neither LAMB nor LARS, and Adam's bias correction
does not match Reddi et al., so all four are written here, on plain tensors.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

OPTIMIZERS: tuple[str, ...] = ("fedavg", "fedadam", "lamb", "lars")

#: Each optimizer's hyperparameters and their defaults; a key not listed does not apply to it.
#: fedadam: Reddi et al.'s / Flower's betas and tau, but lr 0.01, not Flower's 0.1: Adam moves every
#: coordinate by about lr a round, and 0.1 wrecked configs/federated.toml (avg accuracy 0.10 vs
#: 0.51 with 0.01). lamb: You et al. 2020's beta2 and eps; lars: the paper's momentum. lamb/lars
#: lr: a step of 1% of each layer's norm per round.
DEFAULTS: dict[str, dict[str, float]] = {
    "fedavg": {"lr": 1.0},
    "fedadam": {"lr": 0.01, "momentum": 0.9, "beta2": 0.99, "eps": 1e-3},
    "lamb": {"lr": 0.01, "momentum": 0.9, "beta2": 0.999, "eps": 1e-6, "weight_decay": 0.0},
    "lars": {"lr": 0.01, "momentum": 0.9, "weight_decay": 0.0},
}


def resolve_hyperparameters(name: str, **given: float | None) -> dict[str, float]:
    """The optimizer's hyperparameters: the defaults, overridden by the given (non-None) values.

    Refuses an unknown optimizer, a value for a key the optimizer does not use, and values out of
    range, naming the ``[federated]`` key (``server_<key>``).
    """
    if name not in DEFAULTS:
        raise ValueError(f"federated.server_optimizer: {name!r} is not one of {OPTIMIZERS}")
    hp = dict(DEFAULTS[name])
    for key, value in given.items():
        if value is None:
            continue
        if key not in hp:
            raise ValueError(f"federated.server_{key}: the {name!r} server optimizer does not use it "
                             f"(it takes {', '.join('server_' + k for k in hp)})")
        hp[key] = float(value)
    if not (hp["lr"] > 0 and math.isfinite(hp["lr"])):
        raise ValueError(f"federated.server_lr: must be finite and > 0, got {hp['lr']}")
    for key in ("momentum", "beta2"):
        if key in hp and not 0.0 <= hp[key] < 1.0:
            raise ValueError(f"federated.server_{key}: must be in [0, 1), got {hp[key]}")
    if "eps" in hp and not hp["eps"] > 0:
        raise ValueError(f"federated.server_eps: must be > 0, got {hp['eps']}")
    if "weight_decay" in hp and not hp["weight_decay"] >= 0:
        raise ValueError(f"federated.server_weight_decay: must be >= 0, got {hp['weight_decay']}")
    return hp


class ServerOptimizer:
    """One of :data:`OPTIMIZERS` with its state (moments, step count) for checkpoints."""

    def __init__(self, name: str = "fedavg", **hyperparameters: float | None):
        self.name = name
        self.hp = resolve_hyperparameters(name, **hyperparameters)
        self.steps = 0
        self.m: dict[str, Tensor] = {}  # first moment (fedadam, lamb) or LARS' momentum buffer
        self.v: dict[str, Tensor] = {}  # second moment (fedadam, lamb)

    def describe(self) -> str:
        """E.g. ``lamb lr=0.01 momentum=0.9 beta2=0.999 eps=1e-06 weight_decay=0``."""
        return " ".join([self.name, *(f"{k}={v:g}" for k, v in self.hp.items())])

    @property
    def is_identity(self) -> bool:
        """Plain FedAvg: the new global model is the aggregate."""
        return self.name == "fedavg" and self.hp["lr"] == 1.0

    def step(self, current: dict[str, Tensor], aggregated: dict[str, Tensor]) -> dict[str, Tensor]:
        """The new global weights from the current ones and the round's aggregate (same keys)."""
        if set(current) != set(aggregated):
            raise ValueError(f"the aggregate's keys differ from the global model's: "
                             f"{sorted(set(current) ^ set(aggregated))}")
        if self.is_identity:
            return dict(aggregated)
        self.steps += 1
        out = {}
        for k, agg in aggregated.items():
            x = current[k]
            if not x.is_floating_point():
                out[k] = agg  # counters are not optimised: the aggregate's value
                continue
            if agg.shape != x.shape:
                raise ValueError(f"aggregate {k!r} has shape {tuple(agg.shape)}, the global model {tuple(x.shape)}")
            out[k] = getattr(self, f"_{self.name}")(k, x, agg.to(x.dtype) - x)
        return out

    # Each rule gets the layer's key, its weights x and Delta = aggregate - x; returns the new x.

    def _fedavg(self, k: str, x: Tensor, delta: Tensor) -> Tensor:
        return x + self.hp["lr"] * delta

    def _fedadam(self, k: str, x: Tensor, delta: Tensor) -> Tensor:
        b1, b2 = self.hp["momentum"], self.hp["beta2"]
        m = self.m[k] = b1 * self.m.get(k, torch.zeros_like(x)) + (1 - b1) * delta
        v = self.v[k] = b2 * self.v.get(k, torch.zeros_like(x)) + (1 - b2) * delta * delta
        return x + self.hp["lr"] * m / (v.sqrt() + self.hp["eps"])

    def _lamb(self, k: str, x: Tensor, delta: Tensor) -> Tensor:
        b1, b2, t = self.hp["momentum"], self.hp["beta2"], self.steps
        g = -delta
        m = self.m[k] = b1 * self.m.get(k, torch.zeros_like(x)) + (1 - b1) * g
        v = self.v[k] = b2 * self.v.get(k, torch.zeros_like(x)) + (1 - b2) * g * g
        r = (m / (1 - b1**t)) / ((v / (1 - b2**t)).sqrt() + self.hp["eps"])
        u = r + self.hp["weight_decay"] * x
        return x - self.hp["lr"] * trust_ratio(x, u) * u

    def _lars(self, k: str, x: Tensor, delta: Tensor) -> Tensor:
        g, wd = -delta, self.hp["weight_decay"]
        w_norm, g_norm = _norm(x), _norm(g)
        local = w_norm / (g_norm + wd * w_norm) if w_norm > 0 and g_norm > 0 else 1.0
        v = self.m[k] = self.hp["momentum"] * self.m.get(k, torch.zeros_like(x)) + self.hp["lr"] * local * (g + wd * x)
        return x - v

    # Checkpoints: everything the next step depends on.

    def state_dict(self) -> dict:
        return {"name": self.name, "hp": dict(self.hp), "steps": self.steps,
                "m": {k: t.clone() for k, t in self.m.items()}, "v": {k: t.clone() for k, t in self.v.items()}}

    def load_state_dict(self, state: dict) -> None:
        if state["name"] != self.name or state["hp"] != self.hp:
            raise ValueError(f"server optimizer state of {state['name']} {state['hp']} cannot be loaded into "
                             f"{self.name} {self.hp}")
        self.steps = int(state["steps"])
        self.m = {k: t.clone() for k, t in state["m"].items()}
        self.v = {k: t.clone() for k, t in state["v"].items()}


def trust_ratio(weights: Tensor, step: Tensor) -> float:
    """LAMB's ``||x_l|| / ||u_l||``, 1 when either norm is 0."""
    w, s = _norm(weights), _norm(step)
    return w / s if w > 0 and s > 0 else 1.0


def _norm(t: Tensor) -> float:
    # float64: the ratio does not depend on the tensors' dtype.
    return float(torch.linalg.vector_norm(t.detach().double()))
