"""GCond: accumulate per-task gradients, arbitrate their conflicts, smooth with momentum.

Paper: "GCond: Gradient Conflict Resolution via Accumulation-based Stabilization for Large-Scale
Multi-Task Learning" (Limarenko et al., 2025). Reference code: AlevLab-dev/GCond,
``grad_conductor.py`` (class ``GradientConductor``, newest stored version, ``use_smooth_logic=True``
path) and its README, both read for this file; an older stored version of ``grad_conductor.py`` was
read too. The paper itself could not be read here: its description below comes from the project's
notes and the README.

Algorithm (one optimizer step):
1. Accumulation (``GCondTrainer``), model in ``eval()``, losses already weighted by the caller.
   "sequential": every task's loss is backpropagated on each of the K batches (N*K backward passes);
   "stochastic": task i only sees batches i*K/N .. (i+1)*K/N - 1 (K backward passes; K % N == 0).
   Each task's gradient is the *mean* over the batches it saw (the code divides each loss by K,
   resp. K/N), i.e. the gradient of ``sum_i mean_b L_i(b)``.
2. Arbitration (``GCond.resolve``), at most 2N iterations: update each task's gradient-norm EMA
   (beta 0.95, initialised at 1.0) once, optionally cap the norms, then repeatedly take the pair with
   the lowest cosine (stop when it is >= t_weak), pick a winner w and a loser l, and with
   d = <g_w, g_l>, both updates from the pre-update vectors:
       g_w <- g_w - sin(alpha)           * d / ||g_l||^2 * g_l
       g_l <- g_l - sin(min(alpha, pi/2)) * d / ||g_w||^2 * g_w
   where alpha remaps the cosine with (t_crit, t_main, t_weak) = (-0.8, -0.5, 0) and p = 2:
       cos >= t_main:         t = clamp((cos - t_main)/(t_weak - t_main), 0, 1), alpha = pi/2 (1 - t)
       t_crit < cos < t_main: t = (cos - t_main)/(t_crit - t_main),          alpha = pi/2 + pi/2 t^p
       cos <= t_crit:         alpha = pi (winner kept, loser projected on the winner's normal plane)
   Winner: a task that won the last 3 arbitrations is "dominant" (see below); otherwise the higher
   score 0.8 * max(0, cos(g_k, g_k_prev)) + 0.2 * s_k / (s_i + s_j), s_k = ||g_k|| / EMA_k.
3. g = sum_k g_k; m <- 0.85 m + 0.15 g; the bias-corrected m / (1 - 0.85^t) goes into p.grad and
   any optimizer applies it (the README suggests AdamW with beta1 = 0, as GCond supplies momentum).

Where code, comments, README and the older version disagree, and what is followed here:
- Dominance. README ("a task that wins conflicts for this many steps in a row will automatically
  win the next conflict"), the comment inside the newest code's ``_run_arbitrator`` and the older
  code: the dominant task WINS. The newest code's ``_run_arbitrator`` returns it as the LOSER. Default here:
  ``dominance="readme"`` (wins); ``dominance="code"`` reproduces the newest code. Note that with
  "readme" a dominant task keeps winning every conflict it is in (its own wins keep the window
  full), while "code" breaks such streaks. The window counts arbitrations (pairs resolved), not
  steps as the README says, and it persists across steps, as in the code.
- Stability reference g_k_prev. The newest code's comment says the previous step's *raw* gradients;
  because it projects its accumulators in place before swapping buffers, it actually keeps the
  previous step's *resolved* (capped, projected) gradients. The older code stored the current step's
  raw gradients (so it compared a gradient with itself). Default here: previous step's raw gradients
  (``stability_ref="raw"``), matching the stated intent; ``"resolved"`` reproduces the newest code.
- Critical conflicts. The README describes "winner-takes-all" (the older 4-zone logic zeroes the
  loser); the newest code's default smooth logic, followed here, projects the loser and keeps the
  winner (alpha = pi). The 4-zone logic is not implemented.
- Thresholds: README example and older default (-0.75, -0.5, 0); newest default (-0.8, -0.5, 0),
  used here. Momentum: README example beta 0.9, newest default 0.85, used here.
- eval mode: the README says ``freeze_bn`` puts BatchNorm layers in eval(); the code puts the whole
  model in eval() (dropout off too); the code is followed (``eval_mode=True``).
- K % N: the code only requires it in stochastic mode (sequential needs no split); same here.
- Not carried over: Lion/trust-ratio update (off by default in the newest code), bf16 accumulators
  (float32 here; fp64 inputs stay fp64), autocast, DDP sync, functional_call; and a forward pass is
  shared by the N losses of one batch (the code runs one forward per loss; gradients are the same).
- As in the code: pairs where a gradient has ||g||^2 < eps are skipped; the winner is recorded in the
  history at every arbitration, whatever the zone; the winner's score uses its current (possibly
  already projected, capped) vector; a single task is passed through untouched. Because of the eps
  in the projection denominators, a fully projected pair is left with a cosine of about -1e-9, still
  below t_weak = 0, so it can be picked again for a near-no-op arbitration that still appends a
  winner to the dominance history (the code does the same; tests use ``max_iters=1`` to count wins).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn

from lifelong.strategies.combiners.gradients import task_gradients, write_grad

Mode = Literal["sequential", "stochastic"]
Dominance = Literal["readme", "code"]


def _as_float(g: Tensor) -> Tensor:
    """Arbitration arithmetic in at least float32 (the code computes its dots in float32)."""
    return g if g.dtype == torch.float64 else g.float()


class GCond:
    """Arbitration (``resolve``/``combine``: a ``GradientCombiner``) plus GCond's momentum step.

    State kept across calls, per task index: gradient-norm EMA, previous gradient (stability score),
    winners' history (dominance), and the momentum buffer. A change in the number of tasks resets the
    per-task state (indices would no longer mean the same tasks).
    """

    def __init__(
        self,
        thresholds: tuple[float, float, float] = (-0.8, -0.5, 0.0),
        remap_power: float = 2.0,
        norm_ema_beta: float = 0.95,
        norm_cap: float | None = None,
        max_iters: int | None = None,
        dominance_window: int = 3,
        dominance: Dominance = "readme",
        tie_breaking_weights: tuple[float, float] = (0.8, 0.2),
        stability_ref: Literal["raw", "resolved"] = "raw",
        momentum_beta: float = 0.85,
        eps: float = 1e-8,
    ):
        t_crit, t_main, t_weak = thresholds
        if not (-1.0 <= t_crit <= t_main <= t_weak <= 1.0):
            raise ValueError(
                f"GCond thresholds must satisfy -1 <= crit <= main <= weak <= 1, got {thresholds}"
            )
        if remap_power <= 0:
            raise ValueError(f"GCond remap_power must be > 0, got {remap_power}")
        if not (0.0 <= norm_ema_beta < 1.0 and 0.0 <= momentum_beta < 1.0):
            raise ValueError("GCond norm_ema_beta and momentum_beta must be in [0, 1)")
        if dominance not in ("readme", "code"):
            raise ValueError(f"GCond dominance must be 'readme' or 'code', got {dominance!r}")
        if stability_ref not in ("raw", "resolved"):
            raise ValueError(f"GCond stability_ref must be 'raw' or 'resolved', got {stability_ref!r}")
        if dominance_window < 0:
            raise ValueError(f"GCond dominance_window must be >= 0, got {dominance_window}")
        self.thresholds = (float(t_crit), float(t_main), float(t_weak))
        self.remap_power = float(remap_power)
        self.norm_ema_beta = float(norm_ema_beta)
        self.norm_cap = norm_cap
        self.max_iters = max_iters
        self.dominance_window = dominance_window
        self.dominance = dominance
        self.tie_breaking_weights = tie_breaking_weights
        self.stability_ref = stability_ref
        self.momentum_beta = float(momentum_beta)
        self.eps = float(eps)
        self.momentum: Tensor | None = None
        self.step_idx = 0
        self._reset_tasks(0)
        self.last_stats: dict[str, Any] = {}

    def _reset_tasks(self, n: int) -> None:
        self.num_tasks = n
        self.norm_ema = [1.0] * n  # the code starts at 1.0, "for stability"
        self.prev: Tensor | None = None  # [N, D]; None reads as zeros (stability 0), as in the code
        self.history: deque[int] = deque(maxlen=self.dominance_window)

    # --- arbitration -------------------------------------------------------------------------------
    def effective_alpha(self, cos: float) -> float:
        """Remap a cosine to the 'effective conflict angle' alpha in [0, pi]."""
        c = min(max(cos, -1.0), 1.0)
        t_crit, t_main, t_weak = self.thresholds
        if c >= t_main:  # mild conflict: both gradients partly projected, alpha from pi/2 down to 0
            t = min(max((c - t_main) / (t_weak - t_main + self.eps), 0.0), 1.0)
            return math.pi / 2 * (1.0 - t)
        if c > t_crit:  # strong conflict: loser fully projected, winner less and less (p bends it)
            t = (c - t_main) / (t_crit - t_main + self.eps)
            return math.pi / 2 + math.pi / 2 * t**self.remap_power
        return math.pi  # critical: sin(pi) = 0, the winner is kept as is

    def _dominant(self, k: int) -> bool:
        h = self.history
        return self.dominance_window > 0 and len(h) == self.dominance_window and all(x == k for x in h)

    def _arbitrate(self, i: int, j: int, g: Tensor, sq: list[float]) -> tuple[int, int]:
        """(winner, loser) for the pair (i, j); ties go to i, the lower index, as in the code."""
        dom_i, dom_j = self._dominant(i), self._dominant(j)
        if dom_i != dom_j:
            dom, other = (i, j) if dom_i else (j, i)
            return (dom, other) if self.dominance == "readme" else (other, dom)
        norm = {k: math.sqrt(sq[k]) for k in (i, j)}
        stability = {}
        for k in (i, j):
            if self.prev is None:
                stability[k] = 0.0
            else:
                prev = self.prev[k]
                stability[k] = (g[k] @ prev).item() / (norm[k] * prev.norm().item() + self.eps)
        scaled = {k: norm[k] / (self.norm_ema[k] + self.eps) for k in (i, j)}
        total = scaled[i] + scaled[j]
        w_stab, w_str = self.tie_breaking_weights
        score = {k: w_stab * max(stability[k], 0.0) + w_str * scaled[k] / (total + self.eps) for k in (i, j)}
        return (j, i) if score[j] > score[i] else (i, j)

    def resolve(self, grads: Sequence[Tensor]) -> Tensor:
        """The arbitrated per-task gradients, stacked ``[N, D]``; the inputs are not modified."""
        g = _as_float(torch.stack([t.detach() for t in grads])).clone()
        n = g.shape[0]
        if n != self.num_tasks:
            self._reset_tasks(n)
        stats: dict[str, Any] = {
            "min_cos": 1.0,
            "iterations": 0,
            "projections": 0,
            "pairs": [],
            "winners": [],
        }
        if n <= 1:
            self.last_stats = stats
            return g
        raw_norms = g.norm(dim=1).tolist()
        b = self.norm_ema_beta
        # the EMA is updated once per call, on the raw (uncapped) norms, as in the code
        self.norm_ema = [max(b * e + (1 - b) * r, self.eps) for e, r in zip(self.norm_ema, raw_norms)]
        raw = g.clone() if self.stability_ref == "raw" else None
        if self.norm_cap is not None:
            scale = torch.clamp(self.norm_cap / (g.norm(dim=1, keepdim=True) + self.eps), max=1.0)
            g = g * scale
        t_weak = self.thresholds[2]
        for it in range(self.max_iters or 2 * n):
            stats["iterations"] += 1
            gram = (g @ g.T).tolist()  # every pair's dot product in one matmul
            sq = [gram[k][k] for k in range(n)]
            best, best_cos = None, t_weak  # only cosines below t_weak count as conflicts
            for i in range(n):
                for j in range(i + 1, n):
                    if sq[i] < self.eps or sq[j] < self.eps:
                        continue  # a (near-)zero gradient has no direction to conflict with
                    cos = gram[i][j] / (math.sqrt(sq[i] * sq[j]) + self.eps)
                    if it == 0:
                        stats["min_cos"] = min(stats["min_cos"], cos)
                    if cos < best_cos:
                        best, best_cos = (i, j), cos
            if best is None:
                break
            i, j = best
            w, l = self._arbitrate(i, j, g, sq)
            if self.dominance_window > 0:
                self.history.append(w)
            alpha = self.effective_alpha(best_cos)
            s_w, s_l = math.sin(alpha), math.sin(min(alpha, math.pi / 2))
            d = gram[i][j]
            g_w, g_l = g[w].clone(), g[l].clone()  # both updates use the pre-update vectors
            g[w] = g_w - s_w * d / (sq[l] + self.eps) * g_l
            g[l] = g_l - s_l * d / (sq[w] + self.eps) * g_w
            stats["projections"] += 1
            stats["pairs"].append((i, j))
            stats["winners"].append(w)
        self.prev = raw if raw is not None else g.clone()
        self.last_stats = stats
        return g

    def combine(self, grads: Sequence[Tensor]) -> Tensor:
        """Arbitration then sum (no momentum): GCond as a plain ``GradientCombiner``."""
        return self.resolve(grads).sum(0)

    # --- checkpoints -------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything the next call depends on (the hyper-parameters come from the config)."""
        return {"num_tasks": self.num_tasks, "norm_ema": list(self.norm_ema),
                "prev": None if self.prev is None else self.prev.detach().cpu().clone(),
                "history": list(self.history), "step_idx": self.step_idx,
                "momentum": None if self.momentum is None else self.momentum.detach().cpu().clone()}

    def load_state_dict(self, state: dict[str, Any], device: torch.device | str = "cpu") -> None:
        self._reset_tasks(int(state["num_tasks"]))
        self.norm_ema = [float(e) for e in state["norm_ema"]]
        self.prev = None if state["prev"] is None else state["prev"].to(device)
        self.history.extend(int(w) for w in state["history"])
        self.step_idx = int(state["step_idx"])
        self.momentum = None if state["momentum"] is None else state["momentum"].to(device)

    # --- momentum ----------------------------------------------------------------------------------
    def momentum_step(self, g: Tensor) -> Tensor:
        """m <- beta m + (1 - beta) g, returned bias-corrected (so the first step returns g)."""
        g = _as_float(g.detach())
        if self.momentum is None or self.momentum.shape != g.shape:
            self.momentum, self.step_idx = torch.zeros_like(g), 0
        self.step_idx += 1
        b = self.momentum_beta
        self.momentum.mul_(b).add_(g, alpha=1 - b)
        return self.momentum / (1 - b**self.step_idx)


TaskLossesFn = Callable[[nn.Module, Any], Sequence[Tensor]]


class GCondTrainer:
    """One GCond optimizer step: accumulate over K batches -> arbitrate -> momentum -> p.grad -> step.

    ``task_losses_fn(model, batch)`` returns the N task losses on one batch, already weighted.
    """

    def __init__(
        self,
        num_tasks: int,
        gcond: GCond | None = None,
        mode: Mode = "stochastic",  # the code's default (stochastic_accumulation=True)
        use_momentum: bool = True,  # False = the code's return_raw_grad
        eval_mode: bool = True,
        share_forward: bool = False,
    ):
        if num_tasks < 1:
            raise ValueError(f"GCondTrainer needs num_tasks >= 1, got {num_tasks}")
        if mode not in ("sequential", "stochastic"):
            raise ValueError(f"GCondTrainer mode must be 'sequential' or 'stochastic', got {mode!r}")
        self.num_tasks = num_tasks
        self.gcond = gcond if gcond is not None else GCond()
        self.mode = mode
        self.use_momentum = use_momentum
        self.eval_mode = eval_mode
        # Sequential mode as in the reference: one forward + backward per task per batch (N×K
        # passes). share_forward=True reuses one forward for the N losses of a batch: the same
        # gradients for less compute, but not the cost model behind the paper's 2× claim.
        self.share_forward = share_forward
        self.last_stats: dict[str, Any] = {}

    def _losses(self, model: nn.Module, batch: Any, fn: TaskLossesFn) -> list[Tensor]:
        losses = list(fn(model, batch))
        if len(losses) != self.num_tasks:
            raise ValueError(f"task_losses_fn returned {len(losses)} losses, expected {self.num_tasks}")
        return losses

    def accumulate(
        self, model: nn.Module, params: Iterable[Tensor], task_losses_fn: TaskLossesFn, batches: Iterable[Any]
    ) -> list[Tensor]:
        """Per-task flattened gradients, each the mean over the batches that task saw."""
        params, batches = list(params), list(batches)
        k, n = len(batches), self.num_tasks
        if k == 0:
            raise ValueError("GCondTrainer needs at least one batch")
        if self.mode == "stochastic" and k % n != 0:
            raise ValueError(
                f"stochastic GCond gives each task K/N batches: K={k} batches is not divisible by N={n} tasks"
            )
        acc: list[Tensor | None] = [None] * n
        seen: list[list[int]] = [[] for _ in range(n)]
        forward = backward = 0

        def add(i: int, grad: Tensor, count: int) -> None:
            grad = _as_float(grad) / count
            acc[i] = grad if acc[i] is None else acc[i] + grad

        was_training = model.training
        if self.eval_mode:
            model.eval()  # no dropout, BatchNorm on running stats: the K batches see the same function
        try:
            with torch.enable_grad():
                if self.mode == "sequential" and self.share_forward:
                    for b, batch in enumerate(batches):
                        losses = self._losses(model, batch, task_losses_fn)
                        forward += 1
                        for i, grad in enumerate(task_gradients(params, losses)):
                            add(i, grad, k)
                            seen[i].append(b)
                        backward += n
                elif self.mode == "sequential":
                    for b, batch in enumerate(batches):
                        for i in range(n):
                            losses = self._losses(model, batch, task_losses_fn)
                            forward += 1
                            add(i, task_gradients(params, [losses[i]])[0], k)
                            seen[i].append(b)
                            backward += 1
                else:
                    per = k // n
                    for i in range(n):
                        for b in range(i * per, (i + 1) * per):  # disjoint slices: task i's own batches
                            losses = self._losses(model, batches[b], task_losses_fn)
                            forward += 1
                            add(i, task_gradients(params, [losses[i]])[0], per)
                            seen[i].append(b)
                            backward += 1
        finally:
            model.train(was_training)
        self.last_stats = {"forward_passes": forward, "backward_passes": backward, "task_batches": seen}
        return acc  # type: ignore[return-value]

    def step(
        self,
        model: nn.Module,
        params: Iterable[Tensor],
        task_losses_fn: TaskLossesFn,
        batches: Iterable[Any],
        optimizer: torch.optim.Optimizer,
    ) -> dict[str, Any]:
        params = list(params)
        grads = self.accumulate(model, params, task_losses_fn, batches)
        acc_stats = self.last_stats
        g = self.gcond.combine(grads)
        update = self.gcond.momentum_step(g) if self.use_momentum else g
        write_grad(params, update)  # overwrites p.grad: nothing stale from earlier backward calls
        optimizer.step()
        self.last_stats = {**acc_stats, **self.gcond.last_stats, "update_norm": update.norm().item()}
        return self.last_stats
