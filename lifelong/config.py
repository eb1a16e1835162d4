"""One typed, validated configuration for every Lifelong run.

A config is a TOML file (see ``configs/``) validated by pydantic. Every section
forbids unknown keys, and every error names the key and what it accepts, so a
mistake is refused before any work starts.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, field_validator, model_validator

from lifelong import catalogue
from lifelong.catalogue import (  # noqa: F401  (the specs, where config users have always found them)
    CenterLossSpec,
    EWCSpec,
    JointSpec,
    L2Spec,
    NaiveSpec,
    OnePromptSpec,
    ReplaySpec,
)
from lifelong.gates import check_gates


class ConfigError(ValueError):
    """A config that cannot be run; the message says which key and why."""


_Section = catalogue.Section


# --------------------------------------------------------------------------- stream

#: Built-in streams: name -> (dataset, scenarios it can be, the default scenario).
BUILTIN_STREAMS: dict[str, tuple[str, tuple[str, ...], str]] = {
    "split_digits": ("digits", ("class", "task"), "class"),
    "permuted_digits": ("digits", ("domain",), "domain"),
    "rotated_digits": ("digits", ("domain",), "domain"),
    "split_digits28": ("digits28", ("class", "task"), "class"),
    "rotated_digits28": ("digits28", ("domain",), "domain"),
    "split_digits32c": ("digits32c", ("class", "task"), "class"),
    "split_mnist": ("mnist", ("class", "task"), "class"),
    "permuted_mnist": ("mnist", ("domain",), "domain"),
    "rotated_mnist": ("mnist", ("domain",), "domain"),
    "split_cifar10": ("cifar10", ("class", "task"), "class"),
    "split_cifar100": ("cifar100", ("class", "task"), "class"),
    "npz": ("npz", ("class", "task", "domain"), "class"),
    "folder": ("folder", ("class", "domain"), "class"),
    "population": ("population", ("class",), "class"),
}
#: Number of classes of the built-in datasets (for checks before any data is read).
DATASET_CLASSES = {"population": 10, "digits": 10, "digits28": 10, "digits32c": 10, "mnist": 10, "cifar10": 10, "cifar100": 100}

StreamName = Literal[
    "split_digits", "permuted_digits", "rotated_digits", "split_digits28", "rotated_digits28",
    "split_digits32c", "split_mnist", "permuted_mnist",
    "rotated_mnist", "split_cifar10", "split_cifar100", "npz", "folder", "population",
]


class PopulationConfig(_Section):
    """A generated federated population (``stream.name = "population"``, ``tasks/population.py``):
    each client's data is drawn from its id and the run's seed when it is sampled, so a population
    of any size holds no data for the clients a round does not sample."""

    #: Features per sample (a flat vector: use ``model.name = "mlp"``).
    features: int = Field(32, ge=2)
    #: Median samples per client and experience; sizes are log-normal (heavy-tailed, as client
    #: sizes are in real federations) with shape ``size_sigma`` (0: all equal), clipped to ``[1, size_max]``.
    size_median: int = Field(24, ge=1)
    size_sigma: float = Field(1.0, ge=0)
    size_max: int = Field(1000, ge=1)
    #: Each client's class mix: Dirichlet(label_alpha) over the classes (small: few classes each).
    label_alpha: float = Field(0.5, gt=0)
    #: Each client's own feature shift (standard deviation, in units of the classes' spread), and
    #: the samples' noise around their class centre plus the shift.
    shift: float = Field(0.5, ge=0)
    noise: float = Field(1.0, gt=0)
    #: The clients (ids 0..panel-1) whose data make the stream's pooled training and test splits: the
    #: global model's test set, and what a continual (non-federated) run learns.
    panel: int = Field(100, ge=1)

    @model_validator(mode="after")
    def _check_sizes(self) -> PopulationConfig:
        if self.size_max < self.size_median:
            raise ValueError(f"stream.population.size_max: {self.size_max} is below size_median {self.size_median}")
        return self


class StreamConfig(_Section):
    """What is learned: a stream of experiences."""

    name: StreamName = "split_digits"
    #: class-, task- or domain-incremental; defaults to what the stream's name says.
    scenario: Literal["class", "task", "domain"] | None = None
    #: (A folder stream has one per file in ``stream.path``: leave it out.)
    n_experiences: int = Field(5, ge=1)
    #: Domain shift of a domain-incremental npz stream: a pixel permutation or a rotation per
    #: experience, or ``given`` to split by the file's own ``domain`` array.
    domain_shift: Literal["permute", "rotate", "given"] | None = None
    #: Largest rotation (degrees) of rotated streams; experience i is rotated by i/(n-1) of it.
    max_rotation: float = Field(90.0, ge=0, le=360)
    #: Bring-your-own data: an .npz file with ``x``, ``y`` (optionally ``x_test``, ``y_test``, ``domain``);
    #: for the ``folder`` stream, a folder of such files, one experience each, in the order of their names
    #: (a stream that grows: new files are new experiences, ``tracking.continue_from``).
    path: Path | None = None
    #: A folder stream's number of classes (the model's outputs), fixed when its lineage starts so that
    #: later experiences may bring classes not seen yet; default: the largest class id in the files + 1.
    n_classes: int | None = Field(None, ge=2)
    #: Where standard benchmarks (MNIST, CIFAR) are read from; nothing is downloaded.
    data_dir: Path = Path("data")
    #: Test share carved out of data that has no test split of its own (digits, npz without x_test).
    test_fraction: float = Field(0.25, gt=0, lt=1)
    #: Keep the natural class order (0,1 | 2,3 | ...) or shuffle it with the run's seed.
    class_order: Literal["natural", "shuffled"] = "natural"
    #: Share of the training split held apart from the stream (stratified, seeded) to pretrain on.
    holdout_fraction: float = Field(0.0, ge=0, lt=1)
    #: Share of the (remaining) training split carved out, stratified and seeded, as a validation
    #: split that the run evaluates on *instead of* the test split: for choosing hyperparameters
    #: (``lifelong sweep``'s ``[protocol]``) without ever reading the test split. (A generated
    #: population draws fresh validation data from its panel instead: any value > 0 selects it.)
    validation_fraction: float = Field(0.0, ge=0, lt=1)
    #: The generated population's settings (``stream.name = "population"`` only).
    population: PopulationConfig | None = None

    @property
    def dataset(self) -> str:
        return BUILTIN_STREAMS[self.name][0]

    @property
    def resolved_scenario(self) -> str:
        return self.scenario or BUILTIN_STREAMS[self.name][2]

    def _check_folder(self) -> None:
        if self.path is None:
            raise ValueError("stream.path: a folder stream needs the folder that holds its experiences, "
                             "one .npz file (x, y[, x_test, y_test]) each")
        # (Not "was the key given": a config dumped and validated again — a deployment's parameter, a
        # resumed run's record — carries the default.)
        if self.n_experiences != StreamConfig.model_fields["n_experiences"].default:
            raise ValueError("stream.n_experiences: a folder stream has one experience per .npz file in "
                             "stream.path; remove the key")
        if self.holdout_fraction:
            raise ValueError("stream.holdout_fraction: a folder stream grows, so no share of it can be held "
                             "apart for pretraining; use pretrain.path")

    @model_validator(mode="after")
    def _check(self) -> StreamConfig:
        dataset, allowed, _ = BUILTIN_STREAMS[self.name]
        scenario = self.resolved_scenario
        if scenario not in allowed:
            raise ValueError(
                f"stream.scenario: {self.name!r} can be {_one_of(allowed)}, not {scenario!r}"
            )
        if self.name == "npz" and self.path is None:
            raise ValueError("stream.path: an npz stream needs the path of an .npz file with x and y arrays")
        if self.name == "folder":
            self._check_folder()
        elif self.n_classes is not None:
            raise ValueError(f"stream.n_classes: only a folder stream takes it; {self.name!r} knows its classes")
        if self.population is not None and self.name != "population":
            raise ValueError(f"stream.population: only the population stream takes it; {self.name!r} has its own data")
        if self.name not in ("npz", "folder") and self.path is not None:
            raise ValueError(f"stream.path: only the npz stream reads a file; {self.name!r} has its own data")
        if self.domain_shift is not None and scenario != "domain":
            raise ValueError("stream.domain_shift: only a domain-incremental stream has a domain shift")
        if self.name == "npz" and scenario == "domain" and self.domain_shift is None:
            raise ValueError(
                "stream.domain_shift: a domain-incremental npz stream needs one of "
                "'permute', 'rotate', 'given' (split by the file's `domain` array)"
            )
        n_classes = DATASET_CLASSES.get(dataset)
        if scenario in ("class", "task") and n_classes is not None:
            _check_class_split(n_classes, self.n_experiences)
        return self


def _check_class_split(n_classes: int, n_experiences: int) -> None:
    """A class-incremental split must give every experience the same number of classes."""
    if n_experiences > n_classes or n_classes % n_experiences:
        divisors = [d for d in range(1, n_classes + 1) if n_classes % d == 0]
        raise ValueError(
            f"stream.n_experiences: {n_experiences} experiences cannot split {n_classes} classes evenly; "
            f"use one of {divisors}"
        )


# --------------------------------------------------------------------------- model


class ModelConfig(_Section):
    """The network: an MLP, a small CNN or a small ViT (input size taken from the stream)."""

    name: Literal["mlp", "cnn", "vit"] = "cnn"
    hidden: int = Field(256, ge=1)
    #: Widths of the CNN's convolution stages (stage i gets channels[i], the last one repeats);
    #: the image size sets how many stages there are (tasks/models.py, ``conv_stages``).
    channels: tuple[int, ...] = Field((32, 64, 64), min_length=1)
    #: Standardise the input by the training split's per-channel mean and std (the model's first layer).
    standardize_input: bool = True
    dropout: float = Field(0.0, ge=0, lt=1)
    #: ViT: embedding width, blocks, attention heads, patch size (8×8 digits with patch 2: 16 patches).
    vit_dim: int = Field(64, ge=8)
    vit_depth: int = Field(5, ge=1)
    vit_heads: int = Field(4, ge=1)
    vit_patch: int = Field(2, ge=1)

    @model_validator(mode="after")
    def _check_vit(self) -> ModelConfig:
        if self.vit_dim % self.vit_heads:
            raise ValueError(f"model.vit_dim: {self.vit_dim} is not divisible by vit_heads={self.vit_heads}")
        return self


class PretrainConfig(_Section):
    """Pretraining by our own code on the data held apart from the stream (``stream.holdout_fraction``).

    No pretrained weights can be downloaded: this is how the "pretrained backbone" settings of the
    papers (Smith et al.'s L2/EWC claim, OVOR's frozen ViT) are reproduced at small scale.
    """

    epochs: int = Field(0, ge=0)
    lr: float = Field(0.001, gt=0)
    batch_size: int = Field(64, ge=1)
    #: Pretrain on your own .npz (x, y) instead of the held-apart share of the stream's data.
    path: Path | None = None


# --------------------------------------------------------------------------- training


class TrainingConfig(_Section):
    epochs: int = Field(10, ge=1)
    batch_size: int = Field(32, ge=1)
    eval_batch_size: int = Field(1024, ge=1)
    optimizer: Literal["sgd", "adam"] = "adam"
    lr: float = Field(0.001, gt=0)
    momentum: float = Field(0.0, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    #: Evaluate on the experiences seen so far every this many iterations (0: only after each experience).
    eval_every: int = Field(10, ge=0)
    device: Literal["cpu", "cuda", "auto"] = "cpu"
    #: After each experience (and federated round) check that the model learned it and did not
    #: die (tasks/health.py): ``warn`` reports a problem loudly and does not register the model,
    #: ``fail`` also stops the run, ``off`` skips the check.
    health_check: Literal["warn", "fail", "off"] = "warn"
    #: Prefect retries of a failed experience step (continual) or of the rounds (federated); each
    #: retry starts again from the last checkpoint (the end of the previous experience, or of the
    #: last round), so a retried run ends as an unbroken one.
    retries: int = Field(0, ge=0)


# --------------------------------------------------------------------------- strategies


#: A config's strategy: one of the catalogue's learners, told apart by ``name``.
StrategySpec = catalogue.tagged_union(catalogue.STRATEGIES)


def strategy_label(spec: Any) -> str:
    if spec.label:
        return spec.label
    parts = [spec.name, *(["vor"] if getattr(spec, "vor", False) else []),
             *(["masked"] if getattr(spec, "mask_past_logits", False) else []), *(p.name for p in spec.plugins),
             *([f"{spec.arbitrate}({spec.arbitrate_between})"] if spec.arbitrate else [])]
    return "+".join(parts)


# --------------------------------------------------------------------------- multi-task

#: Multi-task problems on the embedded digits: name -> its tasks (``npz`` reads y_<task> arrays).
MULTITASK_PROBLEMS: dict[str, tuple[str, ...]] = {
    "digits_attributes": ("class", "parity", "magnitude"),
    "digits_recon": ("class", "reconstruction"),
    "digits_all": ("class", "parity", "magnitude", "reconstruction"),
}


class CombinerSpec(_Section):
    """How per-task gradients on the shared backbone become one: sum, PCGrad or GCond."""

    name: Literal[tuple(catalogue.names("combiner"))]  # type: ignore[valid-type]
    label: str | None = None
    #: Per-task loss weights (pre-weighting, as GCond's paper does); default all 1.
    weights: list[float] | None = None
    #: GCond: accumulation steps K per update, and how tasks share them.
    accumulation: int = Field(4, ge=1)
    mode: Literal["sequential", "stochastic"] = "stochastic"
    #: GCond: a task that won the last 3 arbitrations wins (README, older code) or loses (newest code).
    dominance: Literal["paper", "code"] = "paper"
    #: What is held equal across combiners: the passes over the data (``multitask.epochs``; GCond
    #: then makes K times fewer optimizer updates), or the optimizer updates (GCond then reads K
    #: times the data) — the budget-matched comparison of GCond against sum and PCGrad.
    budget: Literal["data", "updates"] = "data"


class MultiTaskConfig(_Section):
    problem: Literal["digits_attributes", "digits_recon", "digits_all", "npz"] = "digits_recon"
    #: npz problem: a file with ``x`` and one ``y_<task>`` array per task.
    path: Path | None = None
    #: A subset of the problem's tasks (default: all).
    tasks: list[str] | None = None
    backbone: Literal["mlp", "cnn"] = "mlp"
    hidden: int = Field(128, ge=1)
    combiners: list[CombinerSpec] = Field(default_factory=lambda: [CombinerSpec(name="sum")], min_length=1)
    #: Passes over the training data, the same for every combiner: a combiner that accumulates
    #: K mini-batches per update (GCond) makes K times fewer optimizer updates.
    epochs: int = Field(10, ge=1)
    batch_size: int = Field(32, ge=1)
    optimizer: Literal["adamw", "sgd"] = "adamw"
    lr: float = Field(0.001, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    #: Test-set evaluation every this many epochs.
    eval_every: int = Field(1, ge=1)
    test_fraction: float = Field(0.25, gt=0, lt=1)

    def task_names(self) -> tuple[str, ...] | None:
        if self.tasks:
            return tuple(self.tasks)
        return MULTITASK_PROBLEMS.get(self.problem)

    @model_validator(mode="after")
    def _check(self) -> MultiTaskConfig:
        if self.problem == "npz" and self.path is None:
            raise ValueError("multitask.path: the npz problem needs an .npz file with x and y_<task> arrays")
        known = MULTITASK_PROBLEMS.get(self.problem)
        if known and self.tasks:
            bad = [t for t in self.tasks if t not in known]
            if bad:
                raise ValueError(f"multitask.tasks: {bad} are not tasks of {self.problem!r}; allowed: {list(known)}")
        names = self.task_names()
        if names:  # an npz problem's tasks are known once its file is read (flows/multitask.py)
            check_combiners(self.combiners, len(names))
        labels = [combiner_label(c) for c in self.combiners]
        if len(set(labels)) != len(labels):
            raise ValueError("multitask.combiners: labels must be unique; give each a distinct `label`")
        return self


def check_combiners(combiners: list[CombinerSpec], n_tasks: int) -> None:
    """Weights must match the tasks, and stochastic GCond must split K batches evenly among them."""
    for i, c in enumerate(combiners):
        if c.weights is not None and len(c.weights) != n_tasks:
            raise ValueError(f"multitask.combiners.{i}.weights: {len(c.weights)} weights for {n_tasks} tasks")
        if c.name == "gcond" and c.mode == "stochastic" and c.accumulation % n_tasks:
            raise ValueError(
                f"multitask.combiners.{i}.accumulation: K={c.accumulation} is not divisible by the "
                f"{n_tasks} tasks (N); GCond gives each task K/N batches — use a multiple of {n_tasks}"
            )


def combiner_label(spec: CombinerSpec) -> str:
    if spec.label:
        return spec.label
    name = spec.name if spec.name != "gcond" else f"gcond-{spec.mode}"
    return name + ("@updates" if spec.budget == "updates" and spec.name == "gcond" else "")


# --------------------------------------------------------------------------- tracking


class TrackingConfig(_Section):
    #: MLflow tracking URI; default ``$MLFLOW_TRACKING_URI`` or ``sqlite:///mlruns.db``.
    uri: str | None = None
    experiment: str = "lifelong"
    run_name: str | None = None
    log_model: bool = True
    log_plots: bool = True
    #: Register each finished run's final model in the MLflow model registry (needs log_model).
    register_model: bool = True
    #: Registered model name; default ``lifelong-<flow>`` ('/', ':' and '@' are not allowed).
    model_name: str | None = None
    #: Promotion after registration, ``METRIC OP ALIAS``, e.g. "avg_accuracy>champion"
    #: (lifelong/registry.py); unset: a new version only becomes ``candidate``.
    promote_if: str | None = None
    #: Promotion gates (lifelong/gates.py), e.g. ["avg_accuracy >= champion - 0.01",
    #: "avg_forgetting <= 0.15"]: a new version becomes ``champion`` only when all pass.
    gates: list[str] = Field(default_factory=list)
    #: Keep learning from a registered version of this run's lineage (an alias such as ``champion``, or
    #: a version number): train only the experiences of the folder stream it has not learned, from
    #: its weights and continual state (flows/continuation.py). Unset: start from scratch.
    continue_from: str | None = None

    @field_validator("continue_from", mode="before")
    @classmethod
    def _version_number(cls, v):
        return str(v) if isinstance(v, int) and not isinstance(v, bool) else v

    @field_validator("model_name")
    @classmethod
    def _registrable(cls, v: str | None) -> str | None:
        from lifelong.registry import check_model_name  # imports MLflow: only when the key is set

        return v if v is None else check_model_name(v, "tracking.model_name")

    @field_validator("promote_if")
    @classmethod
    def _rule(cls, v: str | None) -> str | None:
        from lifelong.registry import parse_rule

        if v is not None:
            parse_rule(v, "tracking.promote_if")
        return v


# --------------------------------------------------------------------------- federated


class FederatedConfig(_Section):
    """Flower rounds over the stream: each client holds a private share of every experience."""

    #: Number of (virtual) clients; each gets a share of every experience.
    clients: int = Field(10, ge=1)
    #: Fraction of the clients sampled in each round (at least one must be sampled).
    fraction: float = Field(1.0, gt=0, le=1)
    #: Federated rounds per experience; each sampled client trains ``training.epochs`` local epochs.
    rounds: int = Field(5, ge=1)
    #: How each experience is split across clients: uniform, Dirichlet label skew, or by-class shards.
    partition: Literal["iid", "dirichlet", "shards"] = "iid"
    #: Dirichlet concentration (small: each client sees few classes).
    alpha: float = 0.5
    shards_per_client: int = Field(2, ge=1)
    #: A round aggregates only when at least this many sampled clients replied; otherwise the
    #: global model is kept and the round is logged as skipped.
    min_results: int = Field(1, ge=1)
    #: Seconds the server waits for a round's replies; clients that have not replied by then are
    #: counted as lost for that round.
    round_timeout: float = Field(600.0, gt=0)
    #: Per-client evaluation (every client's accuracy on its own test shares of the experiences
    #: seen so far, and their spread) also every this many rounds, besides each experience's end;
    #: 0: at experience ends only. The global model is evaluated every round either way.
    eval_every_rounds: int = Field(0, ge=0)
    #: Where simulated clients run: in this process (``inprocess``) or on Flower's Ray engine.
    backend: Literal["inprocess", "ray"] = "inprocess"
    #: In-process backend: let each client's state go from memory after its round (it reloads what
    #: it saved to its disk store when sampled again), so only a round's cohort is in memory.
    #: Default: above 1,000 clients (``release_states``). Not on the virtual clock.
    release_client_states: bool | None = None
    #: Ray backend: CPUs per client actor (the engine runs ``cores // num_cpus`` clients at once).
    ray_cpus_per_client: float = Field(1.0, gt=0)
    #: Ray backend: the address (``host:port``) of a running Ray cluster to put the client actors
    #: on (``ray start --head`` prints it); unset, the run starts a Ray instance of its own.
    ray_address: str | None = None
    #: The server's step with the round's averaged update as its (negative) gradient
    #: (strategies/federated/server_optimizers.py): ``fedavg`` (lr 1: plain FedAvg), ``fedadam`` (Reddi et
    #: al. 2021), ``lamb`` / ``lars`` (a trust ratio per layer: You et al. 2020 / 2017).
    server_optimizer: Literal[tuple(catalogue.names("server_optimizer"))] = "fedavg"  # type: ignore[valid-type]
    #: Server learning rate; default per optimizer: fedavg 1, fedadam 0.01, lamb 0.01, lars 0.01.
    server_lr: float | None = Field(None, gt=0)
    #: beta1 of fedadam / lamb, momentum of lars; default 0.9.
    server_momentum: float | None = Field(None, ge=0, lt=1)
    #: beta2 of fedadam (default 0.99) / lamb (0.999).
    server_beta2: float | None = Field(None, ge=0, lt=1)
    #: fedadam's adaptivity tau (default 1e-3) / lamb's epsilon (1e-6).
    server_eps: float | None = Field(None, gt=0)
    #: lamb / lars weight decay on the server's step (default 0).
    server_weight_decay: float | None = Field(None, ge=0)

    @model_validator(mode="after")
    def _check(self) -> FederatedConfig:
        if self.server_optimizer != "fedavg" or any(v is not None for v in self.server_hyperparameters.values()):
            from lifelong.strategies.federated.server_optimizers import (
                resolve_hyperparameters,  # imports torch: only when needed
            )

            resolve_hyperparameters(self.server_optimizer, **self.server_hyperparameters)
        if self.ray_address is not None:
            if self.backend != "ray":
                raise ValueError(f"federated.ray_address is for backend = \"ray\"; this run's backend is "
                                 f"{self.backend!r}")
            host, _, port = self.ray_address.rpartition(":")
            if not host or not port.isdigit():
                raise ValueError(f"federated.ray_address: {self.ray_address!r} is not host:port "
                                 "(the address `ray start --head` prints, e.g. 10.0.0.5:6379)")
        if not self.alpha > 0:
            raise ValueError(f"federated.alpha: Dirichlet concentration must be > 0, got {self.alpha}")
        if int(self.clients * self.fraction) < 1:
            raise ValueError(
                f"federated.fraction: {self.fraction} of {self.clients} clients samples no client "
                f"in a round; use at least {1 / self.clients:.3g}"
            )
        if self.min_results > self.sampled:
            raise ValueError(
                f"federated.min_results: {self.min_results} replies needed but only {self.sampled} "
                f"clients are sampled per round ({self.fraction} × {self.clients})"
            )
        return self

    @property
    def release_states(self) -> bool:
        return self.clients > 1000 if self.release_client_states is None else self.release_client_states

    @property
    def sampled(self) -> int:
        """Clients sampled per round (Flower's FedAvg rounds down)."""
        return int(self.clients * self.fraction)

    @property
    def server_hyperparameters(self) -> dict[str, float | None]:
        """The ``server_*`` keys as :class:`lifelong.strategies.federated.server_optimizers.ServerOptimizer` takes them."""
        return {"lr": self.server_lr, "momentum": self.server_momentum, "beta2": self.server_beta2,
                "eps": self.server_eps, "weight_decay": self.server_weight_decay}


# --------------------------------------------------------------------------- privacy


class SampleDPSection(_Section):
    """Sample-level DP-SGD for local training with Opacus (bridges/avalanche/sample_dp.py): the
    continual flow's learner, or every federated client on its own share (each client its own
    privacy unit, its accountant kept in its ``Context.state`` across rounds; clients/learner.py).
    Sample rate: Opacus' Poisson rate ``1 / ceil(n / batch_size)`` for a share of ``n`` samples."""

    noise_multiplier: float = Field(ge=0)
    max_grad_norm: float = Field(1.0, gt=0)
    clipping: Literal["flat", "per_layer"] = "flat"
    #: Per-layer bounds: C/sqrt(L) each (``uniform``) or proportional to sqrt(layer size) (``size``).
    allocation: Literal["uniform", "size"] = "uniform"
    #: Per-sample gradients by hooks, or Opacus' ghost clipping (flat clipping only).
    grad_sample_mode: Literal["hooks", "ghost"] = "hooks"
    accountant: Literal["rdp", "prv"] = "rdp"
    delta: float = Field(1e-5, gt=0, lt=1)

    @model_validator(mode="after")
    def _ghost(self) -> SampleDPSection:
        if self.grad_sample_mode == "ghost" and self.clipping != "flat":
            raise ValueError("privacy.sample.grad_sample_mode: ghost clipping supports clipping = 'flat' only "
                             "(Opacus 1.6)")
        return self


class ClockConfig(_Section):
    """Federated clients that come and go on a seeded virtual clock (flows/virtual_clock.py):
    heavy-tailed compute speeds, on/off availability, drop-outs mid-round, staggered arrival of
    each experience; the server synchronous with a deadline, or asynchronous (FedBuff, FedAsync).
    Simulated hours cost no wall time; the same seed gives the same event log."""

    #: ``deadline``: synchronous rounds of ``cohort`` clients, ``over_selection`` more started,
    #: late updates dropped (Bonawitz et al. 2019); ``fedbuff``: buffered asynchronous aggregation
    #: (Nguyen et al. 2022); ``fedasync``: each update mixed in at once (Xie et al. 2020).
    mode: Literal["deadline", "fedbuff", "fedasync"] = "fedbuff"
    #: Virtual hours simulated.
    hours: float = Field(24.0, gt=0)
    #: Experience k reaches the clients from hour ``k * experience_hours`` on, each client later by
    #: an exponential delay of mean ``arrival_spread_hours`` (staggered arrivals).
    experience_hours: float = Field(4.0, gt=0)
    arrival_spread_hours: float = Field(1.0, ge=0)
    #: Compute time of one local round on a median client, in minutes; a client's time is this
    #: divided by its speed, log-normal with ``speed_sigma`` (heavy-tailed: a few clients are slow).
    round_minutes: float = Field(10.0, gt=0)
    speed_sigma: float = Field(1.0, ge=0)
    #: ``always``; ``markov``: on/off periods exponential with means ``on_hours`` / ``off_hours``;
    #: ``daily``: on ``on_hours`` a day from a random hour per client; ``trace``: the on-intervals
    #: of ``trace`` (CSV ``client,start_hour,end_hour``).
    availability: Literal["always", "markov", "daily", "trace"] = "markov"
    on_hours: float = Field(2.0, gt=0)
    off_hours: float = Field(2.0, gt=0)
    trace: Path | None = None
    #: Probability that a client drops out in the middle of a round (it contributes nothing).
    dropout: float = Field(0.05, ge=0, lt=1)
    #: deadline mode: clients aggregated per round, the share started beyond it, and the deadline.
    cohort: int = Field(5, ge=1)
    over_selection: float = Field(0.3, ge=0)
    deadline_minutes: float = Field(30.0, gt=0)
    #: fedbuff / fedasync: clients training at any time.
    concurrency: int = Field(5, ge=1)
    #: fedbuff: updates per server step (K), and the server learning rate (eta_g).
    buffer: int = Field(3, ge=1)
    server_lr: float = Field(1.0, gt=0)
    #: fedasync: the mixing weight alpha and the staleness function s (Xie et al. §5.2).
    mixing: float = Field(0.6, gt=0, le=1)
    staleness: Literal["constant", "polynomial", "hinge"] = "polynomial"
    staleness_a: float = Field(0.5, gt=0)
    staleness_b: int = Field(4, ge=0)
    #: Evaluate the global model (pooled and per client) every this many virtual hours.
    eval_every_hours: float = Field(1.0, gt=0)
    #: Checkpoint the loop at the first evaluation after every this many virtual hours (a stopped
    #: run resumes from the last one). Each checkpoint holds the rounds in flight, replies included
    #: (~23 MB with 50 MLP clients in flight), so not every hour by default.
    checkpoint_every_hours: float = Field(4.0, gt=0)

    @model_validator(mode="after")
    def _check(self) -> ClockConfig:
        if self.availability == "trace" and self.trace is None:
            raise ValueError("clock.trace: availability = \"trace\" needs a CSV of client,start_hour,end_hour")
        if self.trace is not None and self.availability != "trace":
            raise ValueError(f"clock.trace: given, but clock.availability is {self.availability!r}; "
                             "set availability = \"trace\" to use it")
        if self.mode == "fedbuff" and self.buffer > self.concurrency:
            raise ValueError(f"clock.buffer: {self.buffer} updates per step but only {self.concurrency} clients "
                             "train at a time (clock.concurrency): the buffer could never fill")
        if self.eval_every_hours > self.hours:
            raise ValueError(f"clock.eval_every_hours: {self.eval_every_hours} > clock.hours = {self.hours}: the "
                             "model would never be evaluated")
        return self


class PrivacyConfig(_Section):
    """User-level differential privacy for federated rounds: every client's update is clipped to
    ``clip`` (modes: privacy/clipping.py) and Gaussian noise of std ``z * clip`` is added
    once to their sum; epsilon is accounted with dp-accounting's PLD accountant."""

    #: ``off``, ``flat`` (global norm), ``per_layer`` (each layer to its own bound),
    #: ``per_layer_normalize`` / ``per_layer_dim`` (the paper code's layer-wise normalisation).
    clipping: Literal[("off", *catalogue.names("clipping"))] = "off"  # type: ignore[valid-type]
    clip: float = Field(1.0, gt=0)
    #: Per-layer bounds: C/sqrt(L) each (``uniform``) or proportional to sqrt(layer size) (``size``).
    allocation: Literal["uniform", "size"] = "uniform"
    #: Give the noise multiplier z, or a target epsilon to calibrate z for before the run.
    noise_multiplier: float | None = Field(None, ge=0)
    target_epsilon: float | None = Field(None, gt=0)
    delta: float = Field(1e-5, gt=0, lt=1)
    #: Account for a larger population than is simulated (the paper's trick): epsilon is then for
    #: ``population`` users with ``cohort`` sampled per round (noise scaled to keep the average's).
    population: int | None = Field(None, ge=1)
    cohort: int | None = Field(None, ge=1)
    #: Refuse a run whose epsilon would exceed this, before it starts.
    max_epsilon: float | None = Field(None, gt=0)
    #: Sample-level DP-SGD for local training (``[privacy.sample]``): the continual flow's learner
    #: or each federated client's. Combinable with the user-level DP above: see
    #: ``Config._check_sample_dp`` for why both guarantees hold.
    sample: SampleDPSection | None = None
    #: Adaptive clipping (Andrew et al. 2021): ``clip`` is the starting bound; after every round
    #: it moves geometrically toward the ``target_quantile`` of the clients' update norms, by
    #: ``C exp(-clip_lr (noised unclipped fraction - target_quantile))``.
    adaptive_clipping: bool = False
    target_quantile: float = Field(0.5, ge=0, le=1)
    clip_lr: float = Field(0.2, gt=0)
    #: sigma_b, std of the noise on the count of unclipped updates; default (sampled clients) / 20
    #: (Andrew et al.). Must exceed z / 2; the update's noise multiplier then drops to
    #: (z^-2 - (2 sigma_b)^-2)^-1/2 so the epsilon stays that of z.
    clipped_count_stddev: float | None = Field(None, gt=0)
    #: Per-client ledger (privacy/ledger.py): each client's epsilon (at ``delta``) from the rounds
    #: it took part in. ``client_budget``: the epsilon a client may spend (default: unlimited; the
    #: ledger is kept either way); a client whose next round would exceed it is no longer sampled.
    client_budget: float | None = Field(None, gt=0)
    #: Per-client overrides: a .json ``{"client": epsilon}`` or .csv ``client,epsilon`` file.
    client_budgets: Path | None = None
    #: The MLflow run id of an earlier federated run whose ledger this run continues (its clients
    #: keep what they spent there; the same delta, number of clients and tracking store).
    ledger_from: str | None = None
    #: Clients keep their own record of the DP rounds they took part in, across runs, and report
    #: the rounds of runs this ledger does not hold, which are charged (clients/privacy_record.py).
    #: Default (None): on in a deployment, where clients are real; off in simulation, where
    #: independent runs (a sweep's cells) reuse the same virtual clients.
    client_records: bool | None = None

    @model_validator(mode="after")
    def _check(self) -> PrivacyConfig:
        for key in ("client_budget", "client_budgets", "ledger_from", "client_records"):
            if getattr(self, key) is not None and self.clipping == "off":
                raise ValueError(f"privacy.{key}: the per-client ledger accounts user-level DP; set "
                                 "privacy.clipping (and noise) too")
        if self.clipping != "off" and (self.noise_multiplier is None) == (self.target_epsilon is None):
            raise ValueError("privacy: give exactly one of noise_multiplier and target_epsilon")
        if self.adaptive_clipping and self.clipping == "off":
            raise ValueError("privacy.adaptive_clipping: adapts the clipping bound; set privacy.clipping too")
        if self.clipped_count_stddev is not None and not self.adaptive_clipping:
            raise ValueError("privacy.clipped_count_stddev: only adaptive clipping noises a count; "
                             "set privacy.adaptive_clipping = true or remove it")
        if self.cohort is not None and self.population is None:
            raise ValueError("privacy.cohort: the stated cohort needs privacy.population")
        return self


# --------------------------------------------------------------------------- the whole config


class Config(_Section):
    seed: int = 0
    #: Which flow runs this config: continual learning over a stream, the same over federated
    #: clients, or multi-task learning.
    flow: Literal["continual", "multitask", "federated"] = "continual"
    stream: StreamConfig = StreamConfig()
    model: ModelConfig = ModelConfig()
    training: TrainingConfig = TrainingConfig()
    pretrain: PretrainConfig = PretrainConfig()
    multitask: MultiTaskConfig = MultiTaskConfig()
    federated: FederatedConfig = FederatedConfig()
    #: Federated clients on a virtual clock (asynchronous or deadline rounds); None: Flower's
    #: synchronous rounds.
    clock: ClockConfig | None = None
    privacy: PrivacyConfig = PrivacyConfig()
    #: One or more strategies, each run on the same stream with the same seed, side by side.
    strategies: list[StrategySpec] = Field(
        default_factory=lambda: [NaiveSpec(name="naive")], min_length=1
    )
    tracking: TrackingConfig = TrackingConfig()

    @model_validator(mode="after")
    def _compatible(self) -> Config:
        for i, spec in enumerate(self.strategies):
            single = [c.name for c in (catalogue.get(spec.name, "strategy"),
                                         *(catalogue.get(p.name, "regularizer") for p in spec.plugins))
                      if c.single_head]
            if single and self.stream.resolved_scenario == "task":
                raise ValueError(f"strategies.{i}: {single[0]} needs a single-head classifier; "
                                 "a task stream has one head per task")
            if isinstance(spec, OnePromptSpec) and self.model.name != "vit":
                raise ValueError(
                    f"strategies.{i}: oneprompt prompts a ViT; set model.name = 'vit' (got {self.model.name!r})"
                )
            if isinstance(spec, OnePromptSpec) and self.stream.resolved_scenario != "class":
                raise ValueError(f"strategies.{i}: oneprompt is a class-incremental method; use a class scenario")
        if self.flow == "federated":
            self._check_federated()
        elif self.clock is not None:
            raise ValueError(f"clock: clients on a virtual clock are federated; set flow = \"federated\" "
                             f"(got {self.flow!r}) or remove [clock]")
        elif self.privacy.clipping != "off":
            raise ValueError("privacy.clipping: user-level DP is for federated runs (flow = \"federated\"); "
                             "for the continual flow use sample-level DP ([privacy.sample])")
        if self.privacy.sample is not None:
            self._check_sample_dp()
        if self.stream.name == "folder" and self.flow != "continual":
            raise ValueError(f"stream.name: a folder stream is for the continual flow (got flow = {self.flow!r})")
        if self.tracking.continue_from is not None:
            self._check_continuation()
        if self.tracking.gates:
            self._check_gates()
        if self.pretrain.epochs and self.stream.resolved_scenario == "task":
            raise ValueError("pretrain.epochs: pretraining is for single-head models (class or domain streams)")
        if self.pretrain.epochs and not (self.stream.holdout_fraction or self.pretrain.path):
            raise ValueError("pretrain.epochs: pretraining needs data: set stream.holdout_fraction > 0 "
                             "or pretrain.path to an .npz file")
        return self

    def _check_continuation(self) -> None:
        """A continuation grows one registered lineage from a folder stream (flows/continuation.py)."""
        t = self.tracking
        if not t.continue_from.strip() or "@" in t.continue_from or "/" in t.continue_from:
            raise ValueError(f"tracking.continue_from: {t.continue_from!r}: give an alias (e.g. 'champion') or a "
                             "version number of this run's lineage")
        if self.flow != "continual" or self.stream.name != "folder":
            raise ValueError("tracking.continue_from: a continuation trains the new files of a folder stream "
                             "(flow = \"continual\", stream.name = \"folder\")")
        if len(self.strategies) != 1 or isinstance(self.strategies[0], JointSpec):
            raise ValueError("tracking.continue_from: a lineage is one strategy; give exactly one (not joint)")
        if not (t.log_model and t.register_model):
            raise ValueError("tracking.continue_from: the continuation registers the next version of the "
                             "lineage; it needs tracking.log_model and tracking.register_model = true")

    def _check_gates(self) -> None:
        """A gate the run cannot judge is refused now, not after training (lifelong/gates.py)."""
        if self.clock is not None:
            raise ValueError("tracking.gates: runs on the virtual clock are not registered yet, so there is no "
                             "version to gate; remove [clock] or the gates")
        check_gates(self.tracking.gates, self.flow, clock=False, dp=self.privacy.clipping != "off",
                    continuing=self.tracking.continue_from is not None)
        if self.tracking.promote_if and re.search(r"champion\s*$", self.tracking.promote_if):
            raise ValueError("tracking.promote_if: with tracking.gates, the gates decide 'champion'; "
                             "drop promote_if or give it another alias")
        if not (self.tracking.register_model and self.tracking.log_model):
            raise ValueError("tracking.gates: gates decide which registered version becomes champion; "
                             "they need tracking.log_model and tracking.register_model = true")

    def _check_sample_dp(self) -> None:
        """Refuse what sample-level DP cannot protect, in the continual flow and in federated clients.

        With user-level DP (``privacy.clipping != "off"``) both guarantees hold independently.
        Sample-level: a client's reply is a DP-SGD output on its share, and what it starts each
        round from (global and boundary models) depends on its own data only through its earlier
        replies, so adaptive composition over the rounds it trained in gives its epsilon; the
        server's clipping and noise are post-processing. User-level: the server clips whatever a
        client sends and noises the sum, which holds for any local training, DP-SGD included.
        """
        if self.flow == "multitask":
            raise ValueError("privacy.sample: sample-level DP is for the continual and federated flows, "
                             "not flow = 'multitask'")
        if self.stream.resolved_scenario == "task":
            # Opacus' DP optimizer wants a per-sample gradient for every parameter it steps.
            raise ValueError("privacy.sample: sample-level DP needs a single-head model; on a task stream "
                             "each experience trains one task's head and the other heads get no per-sample "
                             "gradient, which Opacus refuses; use a class or domain stream")
        for i, spec in enumerate(self.strategies):
            for c in (catalogue.get(spec.name, "strategy"), *(catalogue.get(p.name, "regularizer") for p in spec.plugins)):
                if c.sample_dp_refusal:
                    raise ValueError(f"strategies.{i}: {c.name} cannot be combined with sample-level DP: "
                                     f"{c.sample_dp_refusal}")
            if spec.arbitrate and (why := catalogue.get(spec.arbitrate, "combiner").sample_dp_refusal):
                raise ValueError(f"strategies.{i}.arbitrate: {why}")

    def _check_federated(self) -> None:
        if len(self.strategies) != 1:
            raise ValueError(f"strategies: a federated run trains one learner on every client; "
                             f"got {len(self.strategies)} (run one config per strategy)")
        spec = self.strategies[0]
        if isinstance(spec, JointSpec):
            raise ValueError(f"strategies.0: {spec.name!r} is not available in the federated flow; "
                             "use 'naive', 'replay' (with any plugins) or 'oneprompt'")
        if spec.arbitrate:
            raise ValueError("strategies.0.arbitrate: GCond arbitration keeps per-learner state that "
                             "federated clients do not persist yet; remove it for a federated run")
        if getattr(spec, "mask_past_logits", False):
            raise ValueError("strategies.0.mask_past_logits: not available in the federated flow yet "
                             "(clients train without it); remove it for a federated run")
        if self.clock is not None:
            if self.federated.backend != "inprocess":
                raise ValueError(f"clock: the virtual clock runs its clients in process; set federated.backend "
                                 f"= \"inprocess\" (got {self.federated.backend!r})")
            if self.federated.release_client_states:
                raise ValueError("federated.release_client_states: the virtual clock keeps its clients' states "
                                 "in memory (its checkpoints save them); remove the key for a run on the clock")
            if isinstance(spec, OnePromptSpec):
                raise ValueError("clock: oneprompt's VOR phase needs the server's word that an experience ends, "
                                 "which clients on their own clocks do not get; use naive or replay (with plugins)")
            p = self.privacy
            if p.client_records:
                raise ValueError("privacy.client_records: the virtual clock's clients do not keep their own DP "
                                 "record yet; its ledger carries over with privacy.ledger_from")
            if p.clipping != "off" and p.noise_multiplier is None:
                raise ValueError("privacy.target_epsilon: on the virtual clock, calibrating z to a target epsilon "
                                 "needs a known number of rounds, which clients on a clock do not have; give "
                                 "privacy.noise_multiplier, and bound each client's epsilon with privacy.client_budget")
            if p.clipping != "off" and p.max_epsilon is not None:
                raise ValueError("privacy.max_epsilon: on the virtual clock the run has no epsilon known in advance; "
                                 "bound each client's with privacy.client_budget")
            if p.clipping != "off" and (p.adaptive_clipping or p.population is not None):
                raise ValueError("clock: user-level DP on the virtual clock takes a fixed clip bound and the "
                                 "simulated population; remove privacy.adaptive_clipping / privacy.population")
            if self.clock.mode == "deadline" and self.clock.cohort > self.federated.clients:
                raise ValueError(f"clock.cohort: {self.clock.cohort} clients a round but federated.clients = "
                                 f"{self.federated.clients}")
            if self.clock.mode != "deadline" and self.clock.concurrency > self.federated.clients:
                raise ValueError(f"clock.concurrency: {self.clock.concurrency} clients at a time but "
                                 f"federated.clients = {self.federated.clients}")

    @model_validator(mode="after")
    def _check_population(self) -> Config:
        """A generated population draws each client's data itself; what splits a pooled stream does not apply."""
        if self.stream.name != "population":
            return self
        if self.stream.holdout_fraction:
            raise ValueError("stream.holdout_fraction: a generated population holds nothing apart to pretrain on; "
                             "remove the key")
        if self.seed < 0:
            raise ValueError(f"seed: a generated population draws its clients from a seed >= 0, got {self.seed}")
        if self.flow != "federated":
            return self
        fed, panel = self.federated, (self.stream.population or PopulationConfig()).panel
        if fed.partition != "iid" or fed.alpha != FederatedConfig.model_fields["alpha"].default:
            raise ValueError("federated.partition: a generated population gives each client its own class mix "
                             "(stream.population.label_alpha); remove federated.partition and federated.alpha")
        if panel > fed.clients:
            raise ValueError(f"stream.population.panel: the {panel} clients whose data make the test split must be "
                             f"clients of the run, which has federated.clients = {fed.clients}; set panel <= {fed.clients}")
        return self

    @model_validator(mode="after")
    def _unique_labels(self) -> Config:
        labels = [strategy_label(s) for s in self.strategies]
        dup = sorted({x for x in labels if labels.count(x) > 1})
        if dup:
            raise ValueError(
                f"strategies: labels must be unique, {dup} appear twice; give each a distinct `label`"
            )
        return self

    def flat(self) -> dict[str, str]:
        """The config as flat ``section.key`` strings (MLflow parameters)."""
        return {k: str(v) for k, v in _flatten(self.model_dump(mode="json", by_alias=True)).items()}


# --------------------------------------------------------------------------- loading


def read_toml(path: str | Path) -> dict[str, Any]:
    """A config file's TOML as a dict; a missing file or bad TOML is a :class:`ConfigError`."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        return tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Read a TOML config (or the defaults), apply ``key=value`` overrides, validate.

    Raises :class:`ConfigError` with one line per problem, naming each key.
    """
    data: dict[str, Any] = read_toml(path) if path is not None else {}
    for item in overrides or []:
        apply_override(data, item)
    return validate_config(data)


def validate_config(data: dict[str, Any]) -> Config:
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_describe(exc)) from None


def apply_override(data: dict[str, Any], item: str) -> None:
    """Apply ``a.b.c=value`` in place; the value is read as TOML, else taken as a string.

    List items are addressed by index: ``strategies.1.mem_size=100``.
    """
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {item!r}: expected key=value, e.g. training.epochs=3")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    parts = key.strip().split(".")
    node: Any = data
    for i, part in enumerate(parts[:-1]):
        nxt = parts[i + 1]
        if isinstance(node, list):
            idx = _list_index(node, part, key)
            node = node[idx]
            continue
        if part not in node:
            node[part] = [] if nxt.isdigit() else {}
        node = node[part]
    last = parts[-1]
    if isinstance(node, list):
        node[_list_index(node, last, key)] = value
    else:
        node[last] = value


def _list_index(node: list, part: str, key: str) -> int:
    if not part.isdigit() or int(part) >= len(node):
        raise ConfigError(f"--set {key}: {part!r} is not an index of a list of {len(node)} items")
    return int(part)


def _describe(exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"] if not _is_union_tag(p))
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            allowed = _allowed_keys(err["loc"][:-1])
            msg = f"unknown key; allowed keys here: {', '.join(allowed)}" if allowed else "unknown key"
        elif err["type"] == "union_tag_invalid":
            tags = err.get("ctx", {}).get("expected_tags", "")
            given = err["input"].get("name")
            msg = f"unknown {err['ctx'].get('discriminator', 'name')} {given!r}; allowed: {tags}"
            msg += _elsewhere_hint(given, "plugins" if "plugins" in err["loc"] else "strategies")
        elif err["type"] == "literal_error":
            msg = f"{err['input']!r} is not allowed; expected {err['ctx']['expected']}"
        elif msg.startswith("Value error, "):
            msg = msg.removeprefix("Value error, ")
        lines.append(f"{loc or 'config'}: {msg}" if not msg.startswith(loc or "\0") else msg)
    return "invalid config:\n  " + "\n  ".join(lines)


def _elsewhere_hint(name: Any, where: str) -> str:
    """A component named where another kind belongs: say where it goes."""
    kinds = {c.kind for c in catalogue.catalogue() if c.name == name}
    if where == "strategies" and "regularizer" in kinds:
        return (f". {name!r} is a regulariser: add it to a strategy's plugins, e.g. "
                f'[[strategies]] name = "naive" plugins = [{{name = "{name}"}}]')
    if where == "plugins" and "strategy" in kinds:
        return f". {name!r} is a strategy: give it as [[strategies]] name = \"{name}\", not as a plugin"
    if "combiner" in kinds:
        return f". {name!r} is a multi-task combiner: set flow = \"multitask\" and list it in [[multitask.combiners]]"
    return ""


def _is_union_tag(part: Any) -> bool:
    # pydantic puts the discriminator tag ('naive', 'replay'...) into the error location.
    return isinstance(part, str) and any(_is_tag_of(m, part) for m in _TAGGED_MODELS)


def _allowed_keys(loc: tuple) -> list[str]:
    model: Any = Config
    for part in loc:
        if isinstance(part, int):
            continue
        if part in ("strategies", "plugins") and model in (Config, *_TAGGED_MODELS):
            model = list
            continue
        if model is list:  # a strategy or plugin spec, addressed by its tag
            model = next((m for m in _TAGGED_MODELS if _is_tag_of(m, part)), None)
            continue
        field = getattr(model, "model_fields", {}).get(part)
        if field is None:
            return []
        model = field.annotation
    fields = getattr(model, "model_fields", {})
    return sorted(f.alias or name for name, f in fields.items())


def _is_tag_of(model: Any, tag: Any) -> bool:
    return model.model_fields["name"].annotation.__args__[0] == tag


_TAGGED_MODELS = tuple(c.spec for c in (*catalogue.STRATEGIES, *catalogue.REGULARIZERS) if c.spec is not None)
# (combiners are not a tagged union: their `name` is a plain Literal field)


def _one_of(values: tuple[str, ...] | list[str]) -> str:
    return ", ".join(repr(v) for v in values)


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    if isinstance(d, dict):
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}{k}."))
    elif isinstance(d, list):
        for i, v in enumerate(d):
            out.update(_flatten(v, f"{prefix}{i}."))
    else:
        out[prefix[:-1]] = d
    return out
