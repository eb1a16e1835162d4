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
