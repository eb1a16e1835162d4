"""Baseline learners from Avalanche, not rewritten: naive fine-tuning, replay, joint training.

``build_learner`` turns one strategy spec of the config into an Avalanche strategy; plugins
(continual evaluation, progress, regularisers) are passed in by the caller.
"""

from __future__ import annotations

import contextlib
import warnings

import torch
from avalanche.training import JointTraining, Naive
from avalanche.training.plugins import EvaluationPlugin, ReplayPlugin
from avalanche.training.templates import SupervisedTemplate

from lifelong.config import JointSpec, NaiveSpec, OnePromptSpec, ReplaySpec, TrainingConfig


def make_optimizer(cfg: TrainingConfig, model: torch.nn.Module, trainable_only: bool = False):
    params = [p for p in model.parameters() if p.requires_grad or not trainable_only]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("training.device='cuda' but no CUDA device is available; use 'cpu' or 'auto'")
    return torch.device(name)


class SilentEvaluator(EvaluationPlugin):
    """An evaluator that takes no part in training callbacks.

    Avalanche's template needs an ``EvaluationPlugin``, but Lifelong computes no Avalanche metrics:
    the continual flow evaluates with its own plugin (``tasks/evaluation.py``) and a federated
    client not at all (the server evaluates the global model). The stock plugin forwards every
    ``before_*`` and ``after_*`` callback to its metrics and, even with none, first builds a
    logging view of the experience: about a tenth of a small client round (measured with cProfile
    on the bench workload). Here callbacks resolve to a no-op; everything else is the stock plugin.
    """

    def __init__(self):
        with warnings.catch_warnings():  # "no loggers": none is wanted, nothing is computed to log
            warnings.filterwarnings("ignore", message="No loggers specified")
            super().__init__(loggers=[])

    def __getattribute__(self, item: str):
        if item.startswith(("before_", "after_")):
            return _no_callback
        return super().__getattribute__(item)


def _no_callback(strategy, **kwargs) -> None:
    return None


def build_learner(spec, model: torch.nn.Module, training: TrainingConfig, plugins: list,
                  evaluator: EvaluationPlugin, n_classes: int, seed: int = 0, regularizers: list | None = None,
                  consolidate: bool = True, storage_policy=None, sample_dp=None,
                  template: type[Naive] = Naive) -> SupervisedTemplate:
    """An Avalanche strategy for ``spec`` (naive | replay | joint) with its regularisers.

    A federated client passes its restored ``regularizers`` and replay ``storage_policy``, and
    ``consolidate=False``: it consolidates at experience boundaries itself. ``sample_dp`` (a
    ``SampleDPConfig``) trains with Opacus' DP-SGD; penalties are then added after the noise.
    ``template``: the class of every strategy but joint's (a subclass of Avalanche's ``Naive``:
    a federated client's worker brings its own, ``clients/learner.py``).
    """
    from lifelong.bridges.avalanche.plugin import RegularizerPlugin, build_regularizer

    if spec.freeze_backbone:
        for p in model.backbone.parameters():
            p.requires_grad_(False)

    common = dict(
        model=model,
        optimizer=make_optimizer(training, model),
        criterion=torch.nn.CrossEntropyLoss(),
        train_mb_size=training.batch_size,
        train_epochs=training.epochs,
        eval_mb_size=training.eval_batch_size,
        device=resolve_device(training.device),
        evaluator=evaluator,
    )
    if regularizers is None:
        regularizers = [build_regularizer(p, n_classes) for p in spec.plugins]
    wrap = RegularizerPlugin
    if sample_dp is not None:
        from lifelong.bridges.avalanche.sample_dp import PostNoiseRegularizerPlugin

        wrap = PostNoiseRegularizerPlugin  # a weight-only penalty's gradient, added after the noise
    regularizers = [wrap(r, p.name, consolidate) for r, p in zip(regularizers, spec.plugins)]
    replay = None
    if isinstance(spec, ReplaySpec):
        replay = ReplayPlugin(mem_size=spec.mem_size, batch_size=training.batch_size,
                              batch_size_mem=spec.batch_size_mem or training.batch_size,
                              storage_policy=storage_policy)
    if spec.arbitrate == "gcond":  # after the regularisers: it reads the penalties they added
        from lifelong.bridges.avalanche.arbitration import GCondArbitrationPlugin

        regularizers.append(GCondArbitrationPlugin(spec.arbitrate_between,
                                                   getattr(spec, "batch_size_mem", None) or training.batch_size,
                                                   replay))
    plugins = [*regularizers, *plugins]
    if sample_dp is not None:
        from lifelong.bridges.avalanche.sample_dp import SampleDPPlugin

        # First: it puts the plain model back before the regularisers consolidate.
        plugins = [SampleDPPlugin(sample_dp), *plugins]
    if isinstance(spec, NaiveSpec):
        if spec.mask_past_logits:
            from lifelong.bridges.avalanche.logit_mask import PastLogitMaskPlugin

            plugins = [PastLogitMaskPlugin(), *plugins]
        return template(plugins=plugins, **common)
    if isinstance(spec, ReplaySpec):
        return template(plugins=[replay, *plugins], **common)
    if isinstance(spec, JointSpec):
        return JointTraining(plugins=plugins, **common)
    if isinstance(spec, OnePromptSpec):
        from lifelong.bridges.avalanche.oneprompt import OnePromptPlugin
        from lifelong.strategies.ovor import VORConfig

        vor = VORConfig(lam=spec.vor_lambda, epochs=spec.vor_epochs, anchor=spec.vor_anchor,
                        num_per_class=spec.outliers_per_class) if spec.vor else None
        oneprompt = OnePromptPlugin(model, vor, seed)
        # The backbone is frozen by the plugin: the optimizer gets the prompt and head only.
        common["optimizer"] = make_optimizer(training, model, trainable_only=True)
        return template(plugins=[oneprompt, *plugins], **common)
    raise ValueError(f"unknown strategy {getattr(spec, 'name', spec)!r}")


@contextlib.contextmanager
def quiet_avalanche_deprecations():
    """Drop the DeprecationWarning Avalanche 0.6's own ReplayPlugin raises on every experience.

    Its ``@deprecated`` decorator resets the warning filters on each call, so a filter cannot
    silence it; replacing ``showwarning`` for the duration of training can.
    """
    with warnings.catch_warnings():
        shown = warnings.showwarning

        def show(message, category, *args, **kwargs):
            if not (category is DeprecationWarning and "Call to deprecated function" in str(message)):
                shown(message, category, *args, **kwargs)

        warnings.showwarning = show
        yield
