"""Splitting one experience's training data across federated clients.

Flower Datasets' partitioners do the work (``IidPartitioner``, ``DirichletPartitioner``,
``ShardPartitioner``), applied to an in-memory table of the experience's labels; this module only
adapts them to tensors, seeds them per experience, and refuses impossible requests up front.

* ``iid``: uniform random shares;
* ``dirichlet``: label skew — each class spread over clients by Dirichlet(alpha) proportions
  (small alpha: each client sees few classes);
* ``shards``: sort by label, cut into ``clients × shards_per_client`` shards, deal them out
  (McMahan et al.'s pathological non-IID split).
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch

from lifelong.config import Config
from lifelong.tasks.streams import Stream, experience_share

Method = Literal["iid", "dirichlet", "shards"]


class PartitionError(ValueError):
    """A split that cannot be made; the message says why."""


def check_partition(n_samples: int, n_clients: int, method: Method, alpha: float = 0.5,
                    shards_per_client: int = 2) -> None:
    if n_clients < 1:
        raise PartitionError(f"federated.clients: need at least 1 client, got {n_clients}")
    if n_clients > n_samples:
        raise PartitionError(
            f"federated.clients: {n_clients} clients but the experience has only {n_samples} training samples"
        )
    if method == "dirichlet" and not alpha > 0:
        raise PartitionError(f"federated.alpha: Dirichlet concentration must be > 0, got {alpha}")
    if method == "shards" and n_clients * shards_per_client > n_samples:
        raise PartitionError(
            f"federated.shards_per_client: {n_clients}×{shards_per_client} shards need at least that many "
            f"samples, the experience has {n_samples}"
        )
    if method not in ("iid", "dirichlet", "shards"):
        raise PartitionError(f"federated.partition: unknown {method!r}; allowed: 'iid', 'dirichlet', 'shards'")


def partition(labels: torch.Tensor, n_clients: int, method: Method = "iid", alpha: float = 0.5,
              shards_per_client: int = 2, seed: int = 0) -> list[torch.Tensor]:
    """Indices of each client's samples (disjoint; together all samples, except that Flower's
    shard partitioner drops the remainder that does not fill a shard)."""
    from datasets import Dataset
    from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner, ShardPartitioner

    n = len(labels)
    check_partition(n, n_clients, method, alpha, shards_per_client)
    table = Dataset.from_dict({"label": labels.tolist(), "index": list(range(n))})
    if method == "iid":
        part = IidPartitioner(num_partitions=n_clients)
        table = table.shuffle(seed=seed)  # IidPartitioner splits in order
    elif method == "dirichlet":
        # min_partition_size: Flower resamples until every client has at least this many samples.
        part = DirichletPartitioner(num_partitions=n_clients, partition_by="label", alpha=alpha,
                                    min_partition_size=min(2, n // n_clients), self_balancing=False,
                                    shuffle=True, seed=seed)
    else:
        part = ShardPartitioner(num_partitions=n_clients, partition_by="label",
                                num_shards_per_partition=shards_per_client, shuffle=True, seed=seed)
    part.dataset = table
    return [torch.tensor(part.load_partition(i)["index"], dtype=torch.long) for i in range(n_clients)]


def class_histograms(parts: list[torch.Tensor], labels: torch.Tensor, n_classes: int) -> np.ndarray:
    """clients × classes sample counts (what is plotted to show the skew)."""
    return np.stack([np.bincount(labels[p].numpy(), minlength=n_classes) for p in parts])


def experience_seed(seed: int, experience: int) -> int:
    """A distinct, reproducible seed for splitting each experience."""
    return int(np.random.SeedSequence([seed, experience]).generate_state(1)[0])


def experience_labels(experience) -> torch.Tensor:
    """An Avalanche experience's labels, without reading its inputs."""
    return torch.as_tensor(list(experience.dataset.targets), dtype=torch.long)


# --------------------------------------------------------------------------- clients' shares of a stream
# Read-only data, cached per process: a stream's client split depends only on the config.
_SHARES: dict[tuple, list[torch.Tensor]] = {}
_TEST_SHARES: dict[tuple, list[torch.Tensor]] = {}
# Clients' shares of one experience as Avalanche experiences (read-only too: a training round
# reads its share, never changes it), built once per process and experience, not every round.
_SHARE_EXPERIENCES: dict[tuple, tuple[Stream, dict[int, object]]] = {}


def client_indices(cfg: Config, stream: Stream, experience: int) -> list[torch.Tensor]:
    """Every client's sample indices in ``experience`` (the same in every process)."""
    if stream.population is not None:
        raise PartitionError("a generated population's clients draw their data on demand: they have no indices "
                             "into a pooled split (use client_tensors)")
    key = _split_key(cfg, experience)
    if key not in _SHARES:
        fed = cfg.federated
        labels = experience_labels(stream.train_stream[experience])
        _SHARES[key] = partition(labels, fed.clients, fed.partition, fed.alpha, fed.shards_per_client,
                                 seed=experience_seed(cfg.seed, experience))
    return _SHARES[key]


def client_test_indices(cfg: Config, stream: Stream, experience: int) -> list[torch.Tensor]:
    """Every client's own test share of ``experience`` (indices into its test split), computed once
    per process: each client that evaluates its own model asks for it (``clients/learner.py``)."""
    key = _split_key(cfg, experience)
    if key not in _TEST_SHARES:
        if stream.population is not None:
            _TEST_SHARES[key] = _panel_test_indices(cfg.federated.clients, stream.panel_counts[experience])
        else:
            _TEST_SHARES[key] = _client_test_indices(cfg, stream, experience)
    return _TEST_SHARES[key]


def _panel_test_indices(n_clients: int, counts: list[int]) -> list[torch.Tensor]:
    """A generated population's test shares: the pooled test split is its panel's own test samples,
    client after client, so each panel client is tested on its own; the others hold none."""
    ends = np.cumsum(counts)
    shares = [torch.arange(end - n, end) for n, end in zip(counts, ends)]
    empty = torch.zeros(0, dtype=torch.long)
    return shares[:n_clients] + [empty] * max(0, n_clients - len(shares))


def _client_test_indices(cfg: Config, stream: Stream, experience: int) -> list[torch.Tensor]:
    """Every client's own test share of ``experience`` (indices into its test split).

    Each class's test samples are dealt out, after a seeded shuffle, in proportion to the
    clients' training samples of that class (largest remainders): a client is tested on the
    classes it learned, in the mix it learned them — under label skew its share is as skewed as
    its data. Disjoint; together they are the test samples of every class some client trained on.
    """
    train = client_indices(cfg, stream, experience)
    train_labels = experience_labels(stream.train_stream[experience])
    test_labels = stream.test_tensors(experience)[1]
    gen = torch.Generator().manual_seed(experience_seed(cfg.seed, experience) ^ 0x7E57)
    shares: list[list[torch.Tensor]] = [[] for _ in train]
    for c in sorted(test_labels.unique().tolist()):
        counts = np.array([int((train_labels[idx] == c).sum()) for idx in train])
        if counts.sum() == 0:
            continue
        pool = (test_labels == c).nonzero().flatten()
        pool = pool[torch.randperm(len(pool), generator=gen)]
        start = 0
        for k, n in enumerate(apportion(len(pool), counts)):
            shares[k].append(pool[start:start + n])
            start += n
    return [torch.sort(torch.cat(s)).values if s else torch.zeros(0, dtype=torch.long) for s in shares]


def apportion(n: int, weights: np.ndarray) -> np.ndarray:
    """``n`` items split in proportion to ``weights`` (Hamilton's largest-remainder method)."""
    exact = n * np.asarray(weights, dtype=float) / float(np.sum(weights))
    whole = np.floor(exact).astype(int)
    order = np.argsort(-(exact - whole), kind="stable")
    whole[order[: n - int(whole.sum())]] += 1
    return whole


def client_tensors(cfg: Config, stream: Stream, experience: int, partition_id: int):
    """Client ``partition_id``'s (x, y, task) training samples of ``experience``."""
    if stream.population is not None:
        return stream.population.client_data(partition_id, experience)
    indices = client_indices(cfg, stream, experience)[partition_id]
    return tuple(a[indices] for a in stream.train_tensors(experience))


def client_share(cfg: Config, stream: Stream, experience: int, partition_id: int, samples=None):
    """Client ``partition_id``'s share of ``experience``, as an Avalanche experience. ``samples``:
    a population client's (x, y, task) as ``client_tensors`` drew them (else drawn here)."""
    if stream.population is not None:  # drawn anew each round: no population's worth of shares kept
        if samples is None:
            samples = stream.population.client_data(partition_id, experience)
        return experience_share(stream, experience, samples=samples)
    split = (_split_key(cfg, experience), id(stream))
    if split not in _SHARE_EXPERIENCES:
        _SHARE_EXPERIENCES.clear()  # one experience's shares at a time
        _SHARE_EXPERIENCES[split] = (stream, {})  # (the stream kept: its id is not reused meanwhile)
    shares = _SHARE_EXPERIENCES[split][1]
    if partition_id not in shares:
        indices = client_indices(cfg, stream, experience)[partition_id]
        shares[partition_id] = experience_share(stream, experience, indices)
    return shares[partition_id]


def _split_key(cfg: Config, experience: int) -> tuple:
    fed = cfg.federated
    return (cfg.stream, cfg.seed, fed.clients, fed.partition, fed.alpha, fed.shards_per_client, experience)
