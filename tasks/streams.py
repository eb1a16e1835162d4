"""Task streams: class-, task- and domain-incremental, built with Avalanche's benchmark generators.

``build_stream(config.stream, seed)`` is the one entry point. The same config and seed give the
same stream: the train/test split, the class order and every domain shift are seeded.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import torch
from avalanche.benchmarks.scenarios.dataset_scenario import benchmark_from_datasets
from avalanche.benchmarks.scenarios.supervised import class_incremental_benchmark
from avalanche.benchmarks.scenarios.task_aware import task_incremental_benchmark
from avalanche.benchmarks.utils.classification_dataset import (
    _make_taskaware_tensor_classification_dataset as tensor_dataset,
)

from lifelong.config import BUILTIN_STREAMS, PopulationConfig, StreamConfig, _check_class_split
from lifelong.tasks.data import Arrays, DatasetError, load_cifar, load_digits, load_mnist, load_npz
from lifelong.tasks.distorted_digits import load_distorted_digits
from lifelong.tasks.population import N_CLASSES, Population
from lifelong.tasks.standardize import channel_stats

#: What ``lifelong streams`` shows.
STREAM_DESCRIPTIONS = {
    "split_digits": "8×8 digits (embedded), 10 classes split into experiences (class- or task-incremental)",
    "permuted_digits": "8×8 digits (embedded), all classes, a fixed pixel permutation per experience (domain)",
    "rotated_digits": "8×8 digits (embedded), all classes, a growing rotation per experience (domain)",
    "split_digits28": "28×28 distorted digits (generated offline from the embedded ones), classes split",
    "rotated_digits28": "28×28 distorted digits (generated offline), a growing rotation per experience",
    "split_digits32c": "32×32 colour distorted digits (generated offline), classes split",
    "split_mnist": "MNIST from stream.data_dir, classes split into experiences",
    "permuted_mnist": "MNIST from stream.data_dir, a pixel permutation per experience (domain)",
    "rotated_mnist": "MNIST from stream.data_dir, a rotation per experience (domain)",
    "split_cifar10": "CIFAR-10 from stream.data_dir, classes split into experiences",
    "split_cifar100": "CIFAR-100 from stream.data_dir, classes split into experiences",
    "npz": "your own .npz (x, y[, x_test, y_test, domain]) as a class-, task- or domain-incremental stream",
    "folder": "a folder of .npz files, one experience each in name order, that grows as new data lands",
    "population": "a generated federated population of any size: each client's data drawn from its id on demand",
}


@dataclass
class Stream:
    """An Avalanche benchmark plus what the pipeline needs to know about it."""

    name: str
    scenario: str  # class | task | domain
    benchmark: object  # avalanche CLScenario
    n_classes: int
    input_shape: tuple[int, ...]
    classes_per_experience: list[list[int]]
    #: Training data held apart from the stream for pretraining (``stream.holdout_fraction``).
    holdout: tuple[torch.Tensor, torch.Tensor] | None = None
    #: Per-channel mean and standard deviation of the training split (``tasks/standardize.py``).
    input_stats: tuple[torch.Tensor, torch.Tensor] | None = None
    #: A folder stream's experience files, in order (None for the other streams).
    files: list[Path] | None = None
    _test: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = field(default_factory=list, repr=False)
    _train: tuple[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] | None = field(default=None, repr=False)
    #: A generated population (``tasks/population.py``): clients' data is drawn on demand, and the
    #: pooled splits are its panel's; None for the streams split from one dataset.
    population: Population | None = None
    #: Per experience, how many samples of the pooled evaluation split each panel client gave.
    panel_counts: list[list[int]] | None = None
    #: Each experience's train and test digests (``data_fingerprint``), computed once per stream.
    _digests: list[dict[str, str]] | None = field(default=None, repr=False)

    @property
    def train_stream(self):
        return self.benchmark.train_stream

    @property
    def test_stream(self):
        return self.benchmark.test_stream

    @property
    def n_experiences(self) -> int:
        return len(self.classes_per_experience)

    def test_tensors(self, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Experience ``i``'s test split as (x, y, task) tensors, read once and kept."""
        if not self._test:
            self._test = [_materialize(exp.dataset) for exp in self.test_stream]
        return self._test[i]

    def train_tensors(self, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Experience ``i``'s training split as (x, y, task) tensors. The last one read is kept
        (at most one experience's copy): a federated client process slices every sampled
        client's share of the current experience from it."""
        if self._train is None or self._train[0] != i:
            self._train = (i, _materialize(self.train_stream[i].dataset))
        return self._train[1]


def _materialize(dataset) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # Not through a DataLoader: creating its iterator draws from torch's global RNG, which would
    # make the first run in a process shuffle differently from the next.
    data = dataset.eval()
    x, y, t = torch.utils.data.default_collate([data[i] for i in range(len(data))])
    return x, y, t


def load_arrays(cfg: StreamConfig, seed: int) -> Arrays:
    dataset = cfg.dataset
    if dataset == "digits":
        return load_digits(cfg.test_fraction, seed)
    if dataset in ("digits28", "digits32c"):
        return load_distorted_digits(cfg.test_fraction, seed, colour=dataset == "digits32c")
    if dataset == "npz":
        return load_npz(cfg.path, cfg.test_fraction, seed)
    if dataset == "mnist":
        return load_mnist(cfg.data_dir)
    if dataset in ("cifar10", "cifar100"):
        return load_cifar(cfg.data_dir, 10 if dataset == "cifar10" else 100)
    raise DatasetError(f"stream.name: unknown dataset {dataset!r}")


def build_stream(cfg: StreamConfig, seed: int) -> Stream:
    """Build the configured stream; raises DatasetError/ValueError before any training.

    Kept in-process for the flow's later steps; an npz file edited in between is read anew.
    """
    stamp = None
    if cfg.path is not None and cfg.path.is_file():
        stamp = cfg.path.stat().st_mtime_ns
    elif cfg.path is not None and cfg.path.is_dir():  # a file that lands is a new experience
        stamp = hash(tuple((f.name, f.stat().st_mtime_ns) for f in experience_files(cfg.path)))
    return _build_stream_cached(cfg, seed, stamp)


def experience_files(folder: Path) -> list[Path]:
    """A folder stream's experiences, in arrival order: its ``.npz`` files sorted by name."""
    return sorted(p for p in Path(folder).glob("*.npz") if p.is_file())


@lru_cache(maxsize=4)
def _build_stream_cached(cfg: StreamConfig, seed: int, file_stamp: int | None = None) -> Stream:
    if cfg.name == "folder":
        return _folder_stream(cfg, seed)
    if cfg.name == "population":
        return _population_stream(cfg, seed)
    arrays, holdout = _hold_out(load_arrays(cfg, seed), cfg.holdout_fraction, seed)
    if cfg.validation_fraction:
        arrays = _validation_split(arrays, cfg.validation_fraction, seed)
    scenario = cfg.resolved_scenario
    if scenario in ("class", "task"):
        stream = _class_split(cfg, arrays, seed, task_labels=scenario == "task")
    else:
        stream = _domain_stream(cfg, arrays, seed)
    stream.holdout = holdout
    stream.input_stats = channel_stats(arrays.x_train)
    return stream


def _population_stream(cfg: StreamConfig, seed: int) -> Stream:
    """The generated population's stream: its panel's data as the pooled splits (``tasks/population.py``)."""
    order = list(range(N_CLASSES))
    if cfg.class_order == "shuffled":
        order = torch.randperm(N_CLASSES, generator=torch.Generator().manual_seed(seed)).tolist()
    per = N_CLASSES // cfg.n_experiences
    classes = [sorted(order[i * per:(i + 1) * per]) for i in range(cfg.n_experiences)]
    pop = Population(cfg.population or PopulationConfig(), seed, tuple(tuple(c) for c in classes),
                     cfg.test_fraction, validation=bool(cfg.validation_fraction))
    train, test, counts, inputs = [], [], [], []
    for e in range(cfg.n_experiences):
        (x, y, _), _ = pop.panel_data(e, "train")
        train.append(tensor_dataset(x, y, task_labels=0))
        inputs.append(x)
        (x, y, _), n = pop.panel_data(e, pop.eval_split())
        test.append(tensor_dataset(x, y, task_labels=0))
        counts.append(n)
    bm = benchmark_from_datasets(train=train, test=test)
    for stream in bm.streams.values():  # the experience's classes, whether or not the panel holds each
        for exp, c in zip(stream, classes):
            exp.classes_in_this_experience = list(c)
    out = Stream(cfg.name, "class", bm, N_CLASSES, (pop.cfg.features,), classes, population=pop, panel_counts=counts)
    out.input_stats = channel_stats(torch.cat(inputs))
    return out


def _hold_out(a: Arrays, fraction: float, seed: int):
    """Split a stratified, seeded share of the training data away from the stream."""
    if not fraction:
        return a, None
    from sklearn.model_selection import train_test_split

    idx = torch.arange(len(a.y_train))
    keep, held = train_test_split(idx.numpy(), test_size=fraction, random_state=seed,
                                  stratify=a.y_train.numpy())
    keep, held = torch.from_numpy(keep), torch.from_numpy(held)
    d = None if a.d_train is None else a.d_train[keep]
    rest = Arrays(a.x_train[keep], a.y_train[keep], a.x_test, a.y_test, d, a.d_test)
    return rest, (a.x_train[held], a.y_train[held])


def _validation_split(a: Arrays, fraction: float, seed: int) -> Arrays:
    """Train on the rest of the training split, evaluate on a stratified, seeded share of it: the
    test split is dropped, so a run that chooses hyperparameters cannot read it."""
    from sklearn.model_selection import train_test_split

    counts = torch.bincount(a.y_train, minlength=a.n_classes)
    thin = [c for c, n in enumerate(counts.tolist()) if 0 < n and (n < 2 or round(n * fraction) < 1)]
    if thin:
        raise DatasetError(f"stream.validation_fraction: {fraction} of the training split leaves class(es) "
                           f"{thin} with no validation sample (or no training sample); use a larger fraction")
    idx = torch.arange(len(a.y_train)).numpy()
    keep, val = train_test_split(idx, test_size=fraction, random_state=seed + 7919, stratify=a.y_train.numpy())
    keep, val = torch.from_numpy(keep), torch.from_numpy(val)
    domains = (None, None) if a.d_train is None else (a.d_train[keep], a.d_train[val])
    return Arrays(a.x_train[keep], a.y_train[keep], a.x_train[val], a.y_train[val], *domains)


def _class_split(cfg: StreamConfig, a: Arrays, seed: int, task_labels: bool) -> Stream:
    n_classes = a.n_classes
    _check_class_split(n_classes, cfg.n_experiences)
    present = torch.unique(torch.cat([a.y_train]))
    if len(present) != n_classes:
        missing = sorted(set(range(n_classes)) - set(present.tolist()))
        raise DatasetError(f"stream: classes {missing} have no training samples; class ids must be 0..C-1")
    order = list(range(n_classes))
    if cfg.class_order == "shuffled":
        order = torch.randperm(n_classes, generator=torch.Generator().manual_seed(seed)).tolist()
    bm = class_incremental_benchmark(
        {"train": tensor_dataset(a.x_train, a.y_train, task_labels=0),
         "test": tensor_dataset(a.x_test, a.y_test, task_labels=0)},
        class_order=order,
        num_experiences=cfg.n_experiences,
    )
    if task_labels:
        bm = _with_classes(task_incremental_benchmark(bm, reset_task_labels=True))
    per_exp = n_classes // cfg.n_experiences
    classes = [sorted(order[i * per_exp:(i + 1) * per_exp]) for i in range(cfg.n_experiences)]
    return Stream(cfg.name, "task" if task_labels else "class", bm, n_classes, a.input_shape, classes)


def _domain_stream(cfg: StreamConfig, a: Arrays, seed: int) -> Stream:
    shift = cfg.domain_shift or ("rotate" if cfg.name.startswith("rotated") else "permute")
    if cfg.name.startswith("permuted"):
        shift = "permute"
    gen = torch.Generator().manual_seed(seed)
    n = cfg.n_experiences
    train, test = [], []
    if shift == "given":
        if a.d_train is None:
            raise DatasetError("stream.domain_shift='given' needs a `domain` array in the npz file")
        domains = torch.unique(a.d_train).tolist()
        if len(domains) != n:
            raise DatasetError(
                f"stream.n_experiences: the npz file has {len(domains)} domains {domains}, not {n}"
            )
        for d in domains:
            tr, te = a.d_train == d, a.d_test == d
            train.append((a.x_train[tr], a.y_train[tr]))
            test.append((a.x_test[te], a.y_test[te]))
    else:
        for i in range(n):
            fn = _permutation(a.input_shape, i, gen) if shift == "permute" else _rotation(cfg, i, n)
            train.append((fn(a.x_train), a.y_train))
            test.append((fn(a.x_test), a.y_test))
    bm = benchmark_from_datasets(
        train=[tensor_dataset(x, y, task_labels=0) for x, y in train],
        test=[tensor_dataset(x, y, task_labels=0) for x, y in test],
    )
    classes = [sorted(torch.unique(y).tolist()) for _, y in train]
    return Stream(cfg.name, "domain", _with_classes(bm), a.n_classes, a.input_shape, classes)


def _folder_stream(cfg: StreamConfig, seed: int) -> Stream:
    """One experience per file of ``cfg.path``; each file split as an npz stream's is (its own
    ``x_test`` or a seeded, stratified test share), then validation-split if asked."""
    folder = Path(cfg.path)
    if not folder.is_dir():
        raise DatasetError(f"folder stream: {folder} is not a folder (stream.path)")
    files = experience_files(folder)
    if not files:
        raise DatasetError(f"folder stream: no .npz files in {folder}; each experience is one file with x, y")
    parts = [load_npz(f, cfg.test_fraction, seed) for f in files]
    for f, a in zip(files[1:], parts[1:]):
        if a.input_shape != parts[0].input_shape:
            raise DatasetError(f"folder stream: {f.name} has inputs of shape {a.input_shape}, "
                               f"{files[0].name} of {parts[0].input_shape}")
    n_classes = cfg.n_classes or max(a.n_classes for a in parts)
    for f, a in zip(files, parts):
        if a.n_classes > n_classes:
            raise DatasetError(f"folder stream: {f.name} has class id {a.n_classes - 1}, but stream.n_classes = "
                               f"{n_classes} (ids 0..{n_classes - 1})")
    if cfg.validation_fraction:
        parts = [_validation_split(a, cfg.validation_fraction, seed) for a in parts]
    bm = benchmark_from_datasets(
        train=[tensor_dataset(a.x_train, a.y_train, task_labels=0) for a in parts],
        test=[tensor_dataset(a.x_test, a.y_test, task_labels=0) for a in parts],
    )
    classes = [sorted(torch.unique(a.y_train).tolist()) for a in parts]
    stream = Stream(cfg.name, cfg.resolved_scenario, _with_classes(bm), n_classes, parts[0].input_shape, classes)
    stream.input_stats = channel_stats(torch.cat([a.x_train for a in parts]))
    stream.files = files
    return stream


def _with_classes(bm):
    """Give every experience its ``classes_in_this_experience``.

    ``task_incremental_benchmark`` and ``benchmark_from_datasets`` build experiences without it;
    multi-head models (a head per task) and the regularisers read it. A list: a set breaks
    Avalanche's MultiHeadClassifier.
    """
    for stream in bm.streams.values():
        for exp in stream:
            exp.classes_in_this_experience = sorted(exp.dataset.targets.uniques)
    return bm


def _permutation(shape: tuple[int, ...], i: int, gen: torch.Generator):
    """Experience 0 keeps the original pixels; later experiences each get a fixed random permutation."""
    numel = int(torch.tensor(shape).prod())
    perm = torch.arange(numel) if i == 0 else torch.randperm(numel, generator=gen)
    return lambda x: x.reshape(len(x), -1)[:, perm].reshape(x.shape)


def _rotation(cfg: StreamConfig, i: int, n: int):
    from torchvision.transforms.functional import rotate

    angle = cfg.max_rotation * i / max(1, n - 1)

    def fn(x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4:
            raise DatasetError("stream: rotation needs image data (N×C×H×W or N×H×W), not flat features")
        return rotate(x, angle)

    return fn


def data_fingerprint(stream: Stream, path: Path | None = None) -> dict:
    """What a model learned from, for its registered version (lifelong/registry.py): the sha256 of
    each experience's training and test tensors (as the stream serves them: split, seeded and
    shifted), and of the data file when the stream reads one."""
    def digest(tensors) -> str:
        h = hashlib.sha256()
        for t in tensors:
            h.update(t.detach().cpu().contiguous().numpy().tobytes())
        return h.hexdigest()[:16]

    # Once per stream (streams are kept in-process): hashing reads every experience's training
    # split again, which each run of a sweep or a benchmark in one process would otherwise repeat.
    if stream._digests is None:
        stream._digests = [{"train": digest(stream.train_tensors(i)[:2]), "test": digest(stream.test_tensors(i)[:2])}
                           for i in range(stream.n_experiences)]
    out: dict = {"stream": stream.name, "experiences": [dict(d) for d in stream._digests]}
    if stream.files is not None:
        for e, f in zip(out["experiences"], stream.files):
            e.update({"file": f.name, "sha256": hashlib.sha256(f.read_bytes()).hexdigest()})
    elif path is not None:
        out["file"] = {"path": str(path), "sha256": hashlib.sha256(Path(path).read_bytes()).hexdigest()}
    return out


def describe_streams() -> dict[str, str]:
    return {name: STREAM_DESCRIPTIONS[name] for name in BUILTIN_STREAMS}


def samples_dataset(x: torch.Tensor, y: torch.Tensor, t: torch.Tensor):
    """An Avalanche classification dataset of already-transformed samples (e.g. a replay memory).

    One task label is given as a constant, as the streams do: Avalanche cannot concatenate a
    constant task-label sequence with a per-sample one.
    """
    labels = t.unique()
    return tensor_dataset(x, y, task_labels=int(labels[0]) if len(labels) <= 1 else [int(v) for v in t])


def experience_share(stream: Stream, i: int, indices: torch.Tensor | None = None, samples=None):
    """Experience ``i`` of the training stream holding one client's share: its ``indices`` into the
    experience, or its own ``samples`` (x, y, task) — a generated population's client's data.

    A shallow copy: the share keeps the experience's index, task label and class list (the
    experience's classes, even those the client happens to hold no sample of).
    """
    import copy

    exp = copy.copy(stream.train_stream[i])
    exp._dataset = samples_dataset(*samples) if samples is not None else exp.dataset.subset(indices.tolist())
    return exp
