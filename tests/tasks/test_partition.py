"""Client partitions of an experience (Flower Datasets' partitioners, seeded, checked)."""

import pytest
import torch

from lifelong.tasks.partition import PartitionError, class_histograms, partition

LABELS = torch.arange(400) % 10  # 40 samples of each of 10 classes


def disjoint_cover(parts, n):
    allidx = torch.cat(parts)
    return len(allidx) == len(torch.unique(allidx)) and set(allidx.tolist()) <= set(range(n))


def test_iid_is_disjoint_complete_balanced_and_seeded():
    parts = partition(LABELS, 8, "iid", seed=1)
    assert disjoint_cover(parts, 400) and sum(len(p) for p in parts) == 400
    assert {len(p) for p in parts} == {50}
    assert all(torch.equal(a, b) for a, b in zip(parts, partition(LABELS, 8, "iid", seed=1)))
    assert not all(torch.equal(a, b) for a, b in zip(parts, partition(LABELS, 8, "iid", seed=2)))


def test_dirichlet_small_alpha_skews_labels_more_than_large_alpha():
    def skew(alpha):
        h = class_histograms(partition(LABELS, 5, "dirichlet", alpha=alpha, seed=0), LABELS, 10)
        share = h / h.sum(1, keepdims=True)
        return share.max(1).mean()  # mean share of each client's most common class

    assert skew(0.1) > skew(100.0) + 0.2
    parts = partition(LABELS, 5, "dirichlet", alpha=0.5, seed=0)
    assert disjoint_cover(parts, 400) and sum(len(p) for p in parts) == 400


def test_shards_give_each_client_few_classes():
    parts = partition(LABELS.sort().values, 10, "shards", shards_per_client=2, seed=0)
    h = class_histograms(parts, LABELS.sort().values, 10)
    assert disjoint_cover(parts, 400)
    assert ((h > 0).sum(1) <= 2).all()  # two label-sorted shards: at most two classes each


@pytest.mark.parametrize("kwargs, message", [
    (dict(n_clients=500, method="iid"), "500 clients but the experience has only 400"),
    (dict(n_clients=0, method="iid"), "at least 1 client"),
    (dict(n_clients=4, method="dirichlet", alpha=0.0), "must be > 0"),
    (dict(n_clients=300, method="shards", shards_per_client=2), "300×2 shards"),
    (dict(n_clients=4, method="bogus"), "unknown 'bogus'"),
])
def test_impossible_partitions_are_refused(kwargs, message):
    with pytest.raises(PartitionError, match=message):
        partition(LABELS, **kwargs)
