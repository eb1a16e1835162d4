"""Sample-level differential privacy for local (continual) training: DP-SGD through Opacus.

Abadi, Chu, Goodfellow, McMahan, Mironov, Talwar, Zhang, "Deep Learning with Differential
Privacy", CCS 2016 (DP-SGD: Poisson-sampled batches, each sample's gradient clipped to C,
``N(0, (z C)^2)`` added to the sum); Yousefpour et al., "Opacus: User-Friendly Differential
Privacy Library in PyTorch", 2021 (``PrivacyEngine.make_private``, RDP / PRV accountants). Ghost
clipping is Li, Tramer, Liang, Hashimoto, "Large Language Models Can Be Strong Differentially
Private Learners", ICLR 2022 (Opacus' ``grad_sample_mode="ghost"``: per-sample gradient *norms*
without per-sample gradients, then a second, re-weighted backward). Per-layer clipping (one bound
per parameter tensor, ``sum_l C_l^2 = C^2``) is McMahan et al., ICLR 2018; the bounds come from
``privacy/clipping.layer_bounds``, the same allocation rules as the federated clipping.

How it plugs into Avalanche: :class:`SampleDPPlugin`'s ``before_training_exp`` fires after the
strategy built its loader and optimizer for the experience (``BaseSGDTemplate._before_training_exp``),
so it swaps, for that experience only, the loader for Opacus' Poisson loader over the same
``adapted_dataset``, the optimizer for Opacus' ``DPOptimizer`` around the same optimizer (momentum
state kept) and, in ghost mode, the criterion for Opacus' two-pass loss; ``after_training_exp``
puts the originals back and takes the hooks off. The model is *not* wrapped (Opacus 1.6's
``wrap_model=False``: hooks on the original module), so parameter names never get ``_module.``,
checkpoints and logged models are plain; ``wrap_model=True`` also works, the regularisers
strip the prefix (``regularizer.unwrap_name``).

Why weight penalties need help, and why the fix keeps the guarantee. Opacus steps on
``p.grad = (sum_i clip(g_i) + noise) / B`` built from per-sample gradients that its hooks
capture on the layers; a penalty like L2's ``eps ||theta - theta*||^2`` has no per-sample
part, so whatever it put into ``p.grad`` is overwritten and λ = 0 and λ = 100 give the same step.
:class:`PostNoiseRegularizerPlugin` therefore leaves ``strategy.loss`` alone, and the DP
optimizer's step hook (``DPOptimizer.step_hook``, called after clipping, noise and scaling and
before the wrapped optimizer's step; we chain it after the accountant's) adds
``autograd.grad(penalty, theta)`` to ``p.grad``. The penalty is called with *no data*
(``x = y = features = None``): it is a function of the current weights (already a
post-processing of the DP mechanism's outputs) and of the consolidated state (anchors). So the
update is post-processing and needs no extra accounting, **provided the state is itself private
or public**: L2's anchor is the previous experience's final weights (themselves DP) or the
initial / pretrained weights (public by assumption — data used to pretrain, e.g.
``stream.holdout_fraction``, is outside this guarantee).

Refused, with the reason, before any training (:func:`check_compatible`):

* EWC: its Fisher (``strategies/regularizers/ewc.empirical_fisher``) is squared gradients of the finished
  experience's data, without clipping or noise; the penalty would leak it every step after. A
  private Fisher (clip per-sample gradients to C, sum their squares — L2 sensitivity <= C^2 — add
  noise, compose into the accountant) is possible but not built.
* Center loss: its centers move with every batch's features, with no noise, and are kept.
* Replay: the memory's batches are drawn outside Poisson sampling and its samples are reused
  in later experiences; the accounting would not hold.
* GCond arbitration and OnePrompt/OVOR: per-task gradient arithmetic on raw gradients / outlier
  synthesis from the data, outside the clipped per-sample path.
* A plain ``RegularizerPlugin`` next to DP: its penalty would silently do nothing.

Epsilon: one ``PrivacyEngine`` (accountant ``"rdp"`` or ``"prv"``) for the whole stream; each
experience appends ``(z, q = 1 / len(loader), steps)`` to its history. After each experience
:attr:`SampleDPPlugin.reports` gets the epsilon composed over every experience so far (right when
a sample can be in several experiences: permuted/rotated digits reuse the same images) and the
epsilon of that experience alone (enough, by parallel composition, when experiences are
disjoint, as class-incremental splits are: the stream's epsilon is then their maximum).

Federated clients (``clients/learner.py``) share one strategy per process: :meth:`SampleDPPlugin.reset`
gives it, each round, a fresh engine holding that client's own accountant history (kept in the
client's ``Context.state``), so every client composes only its own rounds.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch
from avalanche.core import SupervisedPlugin
from torch import Tensor, nn

from lifelong import catalogue
from lifelong.bridges.avalanche.plugin import RegularizerPlugin
from lifelong.privacy.sample_level import ExperienceReport, SampleDPConfig, SampleDPError, per_layer_bounds
from lifelong.strategies.regularizers.base import Regularizer


def check_regularizer(regularizer, name: str | None = None) -> None:
    """Refuse a regulariser whose penalty or state reads data that DP-SGD does not protect: what its
    catalogue entry says (lifelong/catalogue.py, ``sample_dp_refusal``); one not in the catalogue is
    not known to read the weights only, and refused too."""
    entry = catalogue.entry_of(regularizer, "regularizer")
    allowed = [c.name for c in catalogue.of_kind("regularizer") if c.sample_dp_refusal is None]
    if entry is None:
        why = (f"{type(regularizer).__qualname__} is not in the catalogue, so it is not known to depend on "
               "the weights only")
    elif entry.sample_dp_refusal is None:
        return
    else:
        why = entry.sample_dp_refusal
    label = name or (entry.name if entry else type(regularizer).__qualname__)
    raise SampleDPError(f"plugin {label!r}{f' ({entry.name})' if entry else ''} cannot be combined "
                        f"with sample-level DP: {why}; regularisers that can: {', '.join(allowed)}")


def _refused_learner_plugins() -> tuple[tuple[type, str], ...]:
    """The learners' own plugins sample-level DP cannot keep its guarantee with, and their catalogue names."""
    from avalanche.training.plugins import ReplayPlugin

    from lifelong.bridges.avalanche.arbitration import GCondArbitrationPlugin
    from lifelong.bridges.avalanche.oneprompt import OnePromptPlugin

    return ((ReplayPlugin, "replay"), (GCondArbitrationPlugin, "gcond"), (OnePromptPlugin, "oneprompt"))


def check_compatible(plugins: Sequence) -> None:
    """Refuse, before training, every plugin that would break the guarantee or be silently dropped."""
    refused = _refused_learner_plugins()
    for p in plugins:
        for cls, name in refused:
            if isinstance(p, cls):
                raise SampleDPError(f"{name} cannot be combined with sample-level DP: "
                                    f"{catalogue.get(name).sample_dp_refusal}")
        if isinstance(p, RegularizerPlugin):
            if not isinstance(p, PostNoiseRegularizerPlugin):
                raise SampleDPError(
                    f"plugin {p.name!r}: under sample-level DP a penalty added to the loss has no "
                    f"per-sample gradient and Opacus drops it; wrap it in PostNoiseRegularizerPlugin")
            check_regularizer(p.regularizer, p.name)


class PostNoiseRegularizerPlugin(RegularizerPlugin):
    """A ``RegularizerPlugin`` whose penalty gradient :class:`SampleDPPlugin` adds after the noise.

    Everything else (anchors at experience boundaries, ``after_update``) is the parent's.
    """

    def __init__(self, regularizer: Regularizer, name: str | None = None, consolidate: bool = True):
        check_regularizer(regularizer, name)
        super().__init__(regularizer, name, consolidate)

    def before_backward(self, strategy, **kwargs):
        pass  # not into the loss: Opacus would drop it (module docstring)

    def weight_penalty(self, model: nn.Module, like: Tensor) -> Tensor:
        """The penalty at the current weights, called with no data at all."""
        penalty = self.regularizer.penalty(model, None, None, like, None)
        self.last_penalty = float(penalty.detach())
        return penalty


def add_penalty_grads(params: Sequence[Tensor], penalty: Tensor) -> list[Tensor | None]:
    """``p.grad += d penalty / d p``, by autograd on the penalty alone (no per-sample hooks)."""
    if not penalty.requires_grad:
        return [None] * len(params)
    grads = torch.autograd.grad(penalty, list(params), allow_unused=True)
    with torch.no_grad():
        for p, g in zip(params, grads):
            if g is None:
                continue
            if p.grad is None:
                p.grad = g.detach().clone()
            else:
                p.grad.add_(g)
    return list(grads)


class _GhostLoss:
    """Avalanche calls ``loss.backward(retain_graph=...)``; Opacus' ghost loss takes no argument."""

    def __init__(self, loss):
        self.loss = loss

    def backward(self, *args, **kwargs):
        self.loss.backward()

    def detach(self):
        return self.loss.detach()

    def item(self):
        return self.loss.item()


class SampleDPPlugin(SupervisedPlugin):
    """DP-SGD for an Avalanche strategy's local training; put it FIRST in the plugin list.

    First, so that its ``after_training_exp`` restores the plain model and optimizer before the
    regularisers consolidate and the loggers read the model.
    """

    def __init__(self, cfg: SampleDPConfig):
        super().__init__()
        self.cfg = cfg
        self._saved = None
        self._hooks = None
        self._regs: list[PostNoiseRegularizerPlugin] = []
        self._history_start = 0
        self._ghost_loss = None
        self.engine = None
        self.reports: list[ExperienceReport] = []
        self.noise_seed: int | None = None  # the noise generator's seed base (None: Opacus' default RNG)
        self.reset(noise_seed=cfg.seed)

    def reset(self, history: Sequence[tuple[float, float, int]] = (), noise_seed: int | None = None) -> None:
        """Start over for another privacy unit: a fresh ``PrivacyEngine`` whose accountant holds
        ``history`` (that unit's earlier ``(noise_multiplier, sample_rate, steps)``), no reports.

        For a strategy lent to several federated clients in turn (``clients/learner.py``): each
        client's accountant composes only its own steps, and nothing of the previous client
        (accountant, the engine's dataset reference, reports) is left on the plugin.
        """
        if self._saved is not None:
            raise SampleDPError("reset while an experience is being trained under DP")
        from opacus import PrivacyEngine

        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*[Ss]ecure.*RNG.*")
            self.engine = PrivacyEngine(accountant=self.cfg.accountant)
        self.engine.accountant.history = [(float(z), float(q), int(s)) for z, q, s in history]
        self.reports = []
        self.noise_seed = noise_seed

    # -- Avalanche hooks ---------------------------------------------------------------------
    def before_training(self, strategy, **kwargs):
        check_compatible(strategy.plugins)

    def before_training_exp(self, strategy, **kwargs):
        check_compatible(strategy.plugins)
        cfg = self.cfg
        self._regs = [p for p in strategy.plugins if isinstance(p, PostNoiseRegularizerPlugin)]
        model, optimizer = strategy.model, strategy.optimizer
        data = strategy.adapted_dataset
        loader = torch.utils.data.DataLoader(data, batch_size=strategy.train_mb_size, shuffle=True,
                                             collate_fn=getattr(data, "collate_fn", None))
        params = [p for g in optimizer.param_groups for p in g["params"] if p.requires_grad]
        bound = per_layer_bounds(params, cfg) if cfg.clipping == "per_layer" else cfg.max_grad_norm
        generator = None
        if self.noise_seed is not None:
            generator = torch.Generator(device=strategy.device).manual_seed(self.noise_seed + len(self.reports))
        self._history_start = _history_steps(self.engine.accountant.history)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*[Ss]ecure.*RNG.*")
            warnings.filterwarnings("ignore", message=".*Optimal order.*")
            # every experience is a new dataset object; the accountant composes them (docstring)
            warnings.filterwarnings("ignore", message=".*detected new dataset object.*")
            out = self.engine.make_private(
                module=model, optimizer=optimizer, data_loader=loader, criterion=strategy._criterion,
                noise_multiplier=cfg.noise_multiplier, max_grad_norm=bound, clipping=cfg.clipping,
                grad_sample_mode=cfg.grad_sample_mode, poisson_sampling=True,
                wrap_model=cfg.wrap_model, noise_generator=generator)
        if cfg.grad_sample_mode == "ghost":
            hooks, dp_optimizer, criterion, dp_loader = out
        else:
            (hooks, dp_optimizer, dp_loader), criterion = out, strategy._criterion
        self._saved = (model, optimizer, strategy._criterion)
        self._hooks = hooks
        self._sample_rate = dp_loader.sample_rate if hasattr(dp_loader, "sample_rate") else 1 / len(dp_loader)
        accountant_hook = dp_optimizer.step_hook

        def step_hook(opt):  # after clip + noise + scale, before the wrapped optimizer steps
            if accountant_hook is not None:
                accountant_hook(opt)
            self._add_penalties(strategy, opt.params)

        dp_optimizer.attach_step_hook(step_hook)
        strategy.optimizer, strategy.dataloader, strategy._criterion = dp_optimizer, dp_loader, criterion
        if cfg.wrap_model:
            strategy.model = hooks

    def before_backward(self, strategy, **kwargs):
        if self.cfg.grad_sample_mode == "ghost" and self._saved is not None:
            self._ghost_loss = strategy.loss
            strategy.loss = _GhostLoss(strategy.loss)

    def after_backward(self, strategy, **kwargs):
        if self._ghost_loss is not None:
            strategy.loss = self._ghost_loss.detach()  # metrics read a plain tensor
            self._ghost_loss = None

    def after_training_exp(self, strategy, **kwargs):
        if self._saved is None:
            return
        model, optimizer, criterion = self._saved
        strategy.model, strategy.optimizer, strategy._criterion = model, optimizer, criterion
        self._hooks.cleanup()
        optimizer.zero_grad(set_to_none=True)
        for p in model.parameters():  # Opacus' per-sample buffers, not to be pickled or logged
            for attr in ("grad_sample", "summed_grad", "_forward_counter"):
                if hasattr(p, attr):
                    try:
                        delattr(p, attr)
                    except AttributeError:
                        pass
        self._saved, self._hooks = None, None
        self.reports.append(self._report(strategy))

    # -- the penalty, after the noise ----------------------------------------------------------
    def _add_penalties(self, strategy, params) -> None:
        if not self._regs:
            return
        model = strategy.model
        like = params[0]
        with torch.enable_grad():
            total = None
            for r in self._regs:
                pen = r.weight_penalty(model, like)
                total = pen if total is None else total + pen
            add_penalty_grads(params, total)

    # -- accounting ----------------------------------------------------------------------------
    def epsilon(self, delta: float | None = None) -> float:
        """Epsilon composed over every DP step so far (Opacus' accountant)."""
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*Optimal order.*")
            return float(self.engine.accountant.get_epsilon(delta or self.cfg.delta))

    def _report(self, strategy) -> ExperienceReport:
        history = list(self.engine.accountant.history)
        steps = _history_steps(history) - self._history_start
        q = float(self._sample_rate)
        eps_exp = (epsilon_for(self.cfg.noise_multiplier, q, steps, self.cfg.delta, self.cfg.accountant)
                   if steps else 0.0)
        eps = self.epsilon() if history else 0.0
        exp_id = getattr(strategy.experience, "current_experience", len(self.reports))
        return ExperienceReport(int(exp_id), q, steps, eps, eps_exp, self.cfg.delta, history)


def sample_dp_config(cfg) -> SampleDPConfig | None:
    """The Opacus settings of a ``Config``'s ``[privacy.sample]``, or None (continual flow and
    federated clients alike)."""
    s = cfg.privacy.sample
    if s is None:
        return None
    return SampleDPConfig(s.noise_multiplier, s.max_grad_norm, s.clipping, s.allocation, s.grad_sample_mode,
                          s.accountant, s.delta, seed=cfg.seed)


def _history_steps(history) -> int:
    return sum(int(s) for _, _, s in history)


def epsilon_for(noise_multiplier: float, sample_rate: float, steps: int, delta: float,
                accountant: str = "rdp") -> float:
    """Opacus' epsilon for ``steps`` of the Poisson-subsampled Gaussian (z, q)."""
    from opacus.accountants import create_accountant

    acc = create_accountant(accountant)
    acc.history = [(noise_multiplier, sample_rate, steps)]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*Optimal order.*")
        return float(acc.get_epsilon(delta))
