"""The one registration: every component a config can name — learners, regularisers, multi-task
combiners, server optimisers, user-level clipping modes — with its config section, how to build
it, what it supports, and the paper it comes from.

Everything that needs to know the components reads this module: the config's unions and
``Literal`` names (lifelong/config.py), ``lifelong strategies``, the refusal rules (sample-level
DP, single-head models), the regulariser plugin's wiring (:func:`build`), and the sample-level DP
plugin's run-time check (:func:`entry_of`). Nothing matches on type names.

A new regulariser is one file and one entry (docs/architecture.md shows it worked through):

1. ``strategies/regularizers/NAME.py``: a class with the :class:`Regularizer` interface
   (``strategies/regularizers/base.py``) whose constructor takes the spec's keys by name, plus
   any of the build context (``n_classes``, ``forward``);
2. here: its spec (a :class:`Section` with ``name: Literal["NAME"]`` and its hyperparameters) and
   a :class:`Component` of kind ``"regularizer"`` naming the class by its import path, appended
   to :data:`REGULARIZERS`.

Build targets are import paths, imported only when built: the ground floor stays free of
algorithms' imports (torch) until a run needs them.
"""

from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, model_validator

Kind = Literal["strategy", "regularizer", "combiner", "server_optimizer", "clipping"]


class Section(BaseModel):
    """A config section: unknown keys refused, values frozen; a key with an alias (``lambda``, a
    Python keyword, for ``lam``) is accepted under either name."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


@dataclass(frozen=True)
class Component:
    name: str  #: what a config calls it (``name = "ewc"``)
    kind: Kind
    summary: str
    paper: str
    implementation: str  #: the files, for ``lifelong strategies``
    spec: type[Section] | None = None  #: its config section (strategies and regularisers)
    build: str | None = None  #: ``module:attribute`` built from the spec (regularisers)
    #: Why sample-level DP (DP-SGD) cannot keep its guarantee with it; None: it can (a regulariser
    #: then adds its penalty's gradient after the noise, as post-processing of the weights).
    sample_dp_refusal: str | None = None
    #: It needs one classifier head (not a task stream's head per task).
    single_head: bool = False


# --------------------------------------------------------------------------- regularisers


class EWCSpec(Section):
    """Elastic Weight Consolidation (Kirkpatrick et al. 2017)."""

    name: Literal["ewc"]
    lam: float = Field(10000.0, ge=0, alias="lambda")
    mode: Literal["separate", "online"] = "separate"
    #: Online mode: F <- decay * F + F_new (1 = no decay, as in Smith et al.'s code).
    decay: float = Field(1.0, gt=0, le=1)


class L2Spec(Section):
    """L2 toward the previous (or initial) backbone parameters (Smith et al. 2022)."""

    name: Literal["l2"]
    eps: float = Field(0.01, ge=0)
    anchor: Literal["previous", "initial"] = "previous"
    #: Which parameters: the backbone (the paper), the head (a regularised linear probe), or all.
    scope: Literal["backbone", "head", "all"] = "backbone"


class FeatureDistillationSpec(Section):
    """Feature distillation toward the previous model's penultimate features (Smith et al. 2022)."""

    name: Literal["feature_distillation"]
    mu: float = Field(1.0, ge=0)


class CenterLossSpec(Section):
    """Center loss on penultimate features, centers and classifier frozen after learning."""

    name: Literal["center_loss"]
    lam: float = Field(1.0, ge=0, alias="lambda")
    alpha: float = Field(0.5, gt=0, le=1)


REGULARIZERS: list[Component] = [
    Component(
        "ewc", "regularizer",
        "Elastic Weight Consolidation: lambda * sum F (theta - theta*)^2, diagonal empirical Fisher",
        "Kirkpatrick et al., Overcoming catastrophic forgetting in neural networks, PNAS 2017; "
        "as studied in Smith et al., A Closer Look at Rehearsal-Free Continual Learning, 2022",
        "strategies/regularizers/ewc.py + bridges/avalanche/plugin.py",
        spec=EWCSpec, build="lifelong.strategies.regularizers.ewc:EWC",
        sample_dp_refusal="its Fisher reads the finished experience's data without clipping or noise",
    ),
    Component(
        "l2", "regularizer", "L2 toward the previous (or initial) backbone parameters, head excluded",
        "Smith et al., A Closer Look at Rehearsal-Free Continual Learning, 2022",
        "strategies/regularizers/l2.py + bridges/avalanche/plugin.py",
        spec=L2Spec, build="lifelong.strategies.regularizers.l2:L2",
    ),
    Component(
        "feature_distillation", "regularizer",
        "feature distillation: mu * mean (f(x) - f_previous(x))^2 on the penultimate features, current data only",
        "Smith et al., A Closer Look at Rehearsal-Free Continual Learning, 2022 (FeatKD)",
        "strategies/regularizers/feature_distillation.py + bridges/avalanche/plugin.py",
        spec=FeatureDistillationSpec,
        build="lifelong.strategies.regularizers.feature_distillation:FeatureDistillation",
        sample_dp_refusal="its penalty reads every sample's features, and would need its own per-sample "
                          "clipping under DP-SGD (not implemented)",
    ),
    Component(
        "center_loss", "regularizer",
        "center loss on penultimate features; centers and classifier frozen after learning",
        "Center Loss Regularization for Continual Learning, 2021 (centers: Wen et al., ECCV 2016)",
        "strategies/regularizers/center_loss.py + bridges/avalanche/plugin.py",
        spec=CenterLossSpec, build="lifelong.strategies.regularizers.center_loss:CenterLoss",
        sample_dp_refusal="its centers move with every batch's features", single_head=True,
    ),
]


def tagged_union(components: list[Component]) -> Any:
    """The config's type for one of ``components``' specs, told apart by their ``name``."""
    specs = tuple(c.spec for c in components if c.spec is not None)
    if len(specs) == 1:
        return specs[0]
    return Annotated[Union[specs], Field(discriminator="name")]  # noqa: UP007 (a tuple built at run time)


#: A learner's ``plugins`` item: one of the regularisers' specs.
RegularizerSpec = tagged_union(REGULARIZERS)

# --------------------------------------------------------------------------- learners


class LearnerSpec(Section):
    label: str | None = None
    #: Train only the head on a frozen (pretrained) backbone — a linear probe.
    freeze_backbone: bool = False
    #: Regularisers added to the learner's loss, composable: e.g. replay + center loss.
    plugins: list[RegularizerSpec] = []
    #: Beyond the GCond paper: arbitrate the current-task gradient against the replay loss's or
    #: the regularisers' penalty's with GCond at every step.
    arbitrate: Literal["gcond"] | None = None
    arbitrate_between: Literal["replay", "penalty"] = "replay"

    @model_validator(mode="after")
    def _arbitration(self) -> "LearnerSpec":
        if self.arbitrate and self.arbitrate_between == "replay" and self.name != "replay":
            raise ValueError("arbitrate_between: 'replay' needs the replay strategy")
        if self.arbitrate and self.arbitrate_between == "penalty" and not self.plugins:
            raise ValueError("arbitrate_between: 'penalty' needs at least one regulariser in plugins")
        return self


class NaiveSpec(LearnerSpec):
    """Fine-tuning on each experience in turn: the lower bound that shows forgetting."""

    name: Literal["naive"]
    #: Train each experience's loss on its own classes' logits only, the others masked to −∞
    #: (evaluation is unmasked): the class-incremental setting of Smith et al.'s regularisation
    #: baselines, where the head is not taught to push old classes down.
    mask_past_logits: bool = False


class ReplaySpec(LearnerSpec):
    """Experience replay with a fixed memory, filled experience-balanced by Avalanche's storage policy."""

    name: Literal["replay"]
    mem_size: int = Field(200, ge=1)
    #: Replayed samples per mini-batch (default: the training batch size).
    batch_size_mem: int | None = Field(None, ge=1)


class JointSpec(LearnerSpec):
    """Training on all experiences at once: the upper bound (not a continual learner)."""

    name: Literal["joint"]

    @model_validator(mode="after")
    def _no_plugins(self) -> "JointSpec":
        if self.plugins:
            raise ValueError("plugins: joint training sees the stream once; it has nothing to regularise")
        return self


class OnePromptSpec(LearnerSpec):
    """OnePrompt (+ virtual outlier regularisation): OVOR, Huang et al., ICLR 2024. Needs model.name='vit'."""

    name: Literal["oneprompt"]
    #: Run the VOR phase (head-only training with virtual outliers) after each experience.
    vor: bool = True
    vor_epochs: int = Field(4, ge=1)
    vor_lambda: float = Field(0.1, ge=0)
    #: Outliers around boundary points (the paper) or around the origin (the released code).
    vor_anchor: Literal["boundary", "origin"] = "boundary"
    outliers_per_class: int = Field(40, ge=1)


STRATEGIES: list[Component] = [
    Component("naive", "strategy", "fine-tune on each experience in turn (lower bound; shows forgetting)",
              "—", "avalanche.training.Naive", spec=NaiveSpec),
    Component("replay", "strategy", "experience replay from a fixed-size, experience-balanced memory",
              "Chaudhry et al., On Tiny Episodic Memories in Continual Learning, 2019",
              "avalanche.training.Naive + avalanche.training.plugins.ReplayPlugin", spec=ReplaySpec,
              sample_dp_refusal="replayed samples are drawn outside Poisson sampling and reused; "
                                "use naive or joint"),
    Component("joint", "strategy", "train on all experiences at once (upper bound; not continual)",
              "—", "avalanche.training.JointTraining", spec=JointSpec),
    Component("oneprompt", "strategy",
              "OnePrompt: one prefix-tuning prompt for all tasks on a frozen ViT; vor=true adds virtual "
              "outlier regularisation of the head (OVOR)",
              "Huang et al., OVOR: OnePrompt with Virtual Outlier Regularization for Rehearsal-Free "
              "Class-Incremental Learning, ICLR 2024 (code: jpmorganchase/ovor)",
              "bridges/avalanche/oneprompt.py + strategies/ovor.py + tasks/vit.py", spec=OnePromptSpec,
              sample_dp_refusal="its VOR phase and outlier search read the data outside DP-SGD"),
]

# --------------------------------------------------------------------------- multi-task combiners

COMBINERS: list[Component] = [
    Component("sum", "combiner", "multi-task: the (weighted) sum of the task losses", "—",
              "strategies/combiners/gradients.py"),
    Component("pcgrad", "combiner", "multi-task: project each task's gradient off the ones it conflicts with",
              "Yu et al., Gradient Surgery for Multi-Task Learning, NeurIPS 2020",
              "strategies/combiners/pcgrad.py"),
    Component("gcond", "combiner",
              "multi-task: accumulate per-task gradients over K batches (sequential/stochastic), arbitrate "
              "conflicting pairs with a smooth projection schedule, momentum; also usable inside a continual "
              "learner (strategy key arbitrate = 'gcond')",
              "GCond: Gradient Conflict Resolution via Accumulation-based Stabilization for Large-Scale "
              "Multi-Task Learning, 2025 (code: AlevLab-dev/GCond)",
              "strategies/combiners/gcond.py (+ bridges/avalanche/arbitration.py)",
              sample_dp_refusal="GCond reads raw gradients outside DP-SGD"),
]

# --------------------------------------------------------------------------- federated server

SERVER_OPTIMIZERS: list[Component] = [
    Component("fedavg", "server_optimizer", "the server steps x + lr * (mean update); lr 1 is plain FedAvg",
              "McMahan et al., Communication-Efficient Learning of Deep Networks from Decentralized "
              "Data, AISTATS 2017", "strategies/federated/server_optimizers.py"),
    Component("fedadam", "server_optimizer", "Adam on the negative mean update (the paper's, no bias correction)",
              "Reddi et al., Adaptive Federated Optimization, ICLR 2021",
              "strategies/federated/server_optimizers.py"),
    Component("lamb", "server_optimizer", "LAMB: Adam moments, each layer's step scaled by its trust ratio",
              "You et al., Large Batch Optimization for Deep Learning, ICLR 2020; as in Pelikan et al., "
              "NeurIPS 2025", "strategies/federated/server_optimizers.py"),
    Component("lars", "server_optimizer", "LARS: momentum SGD, each layer's step scaled by its trust ratio",
              "You, Gitman, Ginsburg, Large Batch Training of Convolutional Networks, 2017",
              "strategies/federated/server_optimizers.py"),
]

# --------------------------------------------------------------------------- user-level clipping

CLIPPING: list[Component] = [
    Component("flat", "clipping", "user-level DP: clip each client's whole update to norm C",
              "McMahan et al., Learning Differentially Private Recurrent Language Models, ICLR 2018",
              "privacy/clipping.py + bridges/flower/dp_fedavg.py"),
    Component("per_layer", "clipping", "user-level DP: clip each layer to its own bound, sum of squares C^2",
              "McMahan et al., ICLR 2018 (per-layer clipping)", "privacy/clipping.py + bridges/flower/dp_fedavg.py"),
    Component("per_layer_normalize", "clipping",
              "user-level DP: over C, every layer rescaled to its bound (the reference code)",
              "Pelikan et al., Enabling Differentially Private Federated Learning for Speech Recognition, "
              "NeurIPS 2025", "privacy/clipping.py + bridges/flower/dp_fedavg.py"),
    Component("per_layer_dim", "clipping", "user-level DP: per_layer_normalize with bounds by layer size",
              "Pelikan et al., NeurIPS 2025", "privacy/clipping.py + bridges/flower/dp_fedavg.py"),
]


def catalogue() -> list[Component]:
    """Every component, in the order ``lifelong strategies`` lists them."""
    return [*STRATEGIES, *REGULARIZERS, *COMBINERS, *SERVER_OPTIMIZERS, *CLIPPING]


def of_kind(kind: Kind) -> list[Component]:
    return [c for c in catalogue() if c.kind == kind]


def names(kind: Kind | None = None) -> list[str]:
    return [c.name for c in catalogue() if kind is None or c.kind == kind]


def get(name: str, kind: Kind | None = None) -> Component:
    for c in catalogue():
        if c.name == name and (kind is None or c.kind == kind):
            return c
    raise KeyError(f"no {kind or 'component'} {name!r} in the catalogue; known: {', '.join(names(kind))}")


def target(component: Component) -> Any:
    """The class or function a component is built with (imported now)."""
    if component.build is None:
        raise ValueError(f"{component.kind} {component.name!r} is not built from the catalogue")
    module, _, attr = component.build.partition(":")
    return getattr(importlib.import_module(module), attr)


def build(spec: Section, **context: Any) -> Any:
    """The component of a config spec: its build target called with the spec's values, by name, and
    with whatever of ``context`` (``n_classes``, ``forward``, ...) the target takes."""
    entry = next((c for c in catalogue() if c.spec is type(spec)), None)
    if entry is None:
        raise ValueError(f"unknown plugin {getattr(spec, 'name', spec)!r}: "
                         f"{type(spec).__qualname__} is the spec of no catalogue entry")
    factory = target(entry)
    accepted = inspect.signature(factory).parameters
    values = spec.model_dump(exclude={"name"})
    unknown = sorted(set(values) - set(accepted))
    if unknown:
        raise TypeError(f"{spec.name}: {factory.__qualname__} takes no {', '.join(unknown)} "
                        "(its constructor's parameters must be named as the spec's keys)")
    return factory(**values, **{k: v for k, v in context.items() if k in accepted})


def entry_of(obj: Any, kind: Kind = "regularizer") -> Component | None:
    """The catalogue entry whose build target is ``obj``'s own class, if any. Exactly that class: a
    subclass may keep state its parent does not (what sample-level DP's check relies on)."""
    for c in of_kind(kind):
        if c.build is not None and type(obj) is target(c):
            return c
    return None
