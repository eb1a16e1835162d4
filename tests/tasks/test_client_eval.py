"""Per-client continual evaluation: the clients' test shares and the per-client figures, on
cases worked out by hand."""

import numpy as np
import pytest
import torch

from lifelong.config import load_config
from lifelong.tasks import client_eval as ce
from lifelong.tasks.partition import apportion, client_indices, client_test_indices, experience_labels
from lifelong.tasks.streams import build_stream


def test_accuracy_of_each_client_from_the_shared_pass():
    correct = torch.tensor([1, 0, 1, 1, 0, 0], dtype=torch.bool)
    shares = [torch.tensor([0, 1]), torch.tensor([2, 3, 4]), torch.tensor([], dtype=torch.long)]
    acc = ce.client_accuracies(correct, shares)
    assert acc[0] == 0.5 and acc[1] == pytest.approx(2 / 3) and np.isnan(acc[2])


def test_seen_accuracy_and_forgetting_by_hand():
    # 2 clients, 3 experiences; client 1 holds no data of experience 1 (NaN).
    rows = [np.array([[0.9, 0.1, 0.0], [0.8, np.nan, 0.1]]),
            np.array([[0.6, 0.9, 0.2], [0.7, np.nan, 0.0]]),
            np.array([[0.5, 0.7, 0.8], [0.4, np.nan, 0.9]])]
    assert ce.seen_accuracy(rows[1], 1) == pytest.approx([0.75, 0.7])
    assert ce.seen_accuracy(rows[2], 2) == pytest.approx([2.0 / 3, 0.65])
    # client 0: exp0 best 0.9 -> 0.5 (0.4), exp1 best 0.9 -> 0.7 (0.2): 0.3; client 1: exp0 0.8 -> 0.4 only.
    assert ce.client_forgetting(rows) == pytest.approx([0.3, 0.4])


def test_spread_of_clients():
    values = np.array([0.2, np.nan, 0.4, 0.6, 0.8, 1.0])
    s = ce.spread(values)
    assert s["mean"] == pytest.approx(0.6) and s["worst"] == 0.2 and s["p50"] == pytest.approx(0.6)
    assert s["p10"] == pytest.approx(0.28) and s["p90"] == pytest.approx(0.92)  # linear interpolation
    assert s["std"] == pytest.approx(np.sqrt(0.08))
    assert ce.spread(np.array([0.1, 0.3]), worst="max")["worst"] == 0.3
    assert ce.spread(np.array([np.nan])) == {}


def test_the_table_gives_the_rows_back_and_names_the_worst_clients():
    rows = [np.array([[0.9, np.nan], [0.5, 0.2], [0.7, 0.1]]), np.array([[0.8, 0.9], [0.1, 0.6], [0.3, 0.5]])]
    table = ce.matrix_table(rows, [[5, 5, 5], [0, 4, 4]])
    assert [line for line in table["data"] if line[0] == 0 and line[1] == 0] == [[0, 0, 0, 0.9, 5]]
    back = ce.rows_from_table(table)
    assert all(np.array_equal(a, b, equal_nan=True) for a, b in zip(back, rows))
    worst = ce.worst_clients(rows, k=2)
    assert [c for c, _, _ in worst] == [1, 2] and worst[0][1] == pytest.approx(0.35)
    assert worst[0][2] == pytest.approx(0.4)  # client 1 forgot experience 0: 0.5 -> 0.1


def test_apportion_by_largest_remainders():
    assert apportion(10, np.array([1, 1, 1])).tolist() == [4, 3, 3]
    assert apportion(7, np.array([0, 5, 2])).tolist() == [0, 5, 2]
    assert apportion(5, np.array([3, 0, 1])).tolist() == [4, 0, 1]  # 3.75, 0, 1.25
    assert apportion(0, np.array([2, 2])).tolist() == [0, 0]


@pytest.mark.parametrize("partition", ["iid", "dirichlet"])
def test_each_client_is_tested_on_its_own_classes_in_its_own_mix(partition):
    cfg = load_config(None, ['flow="federated"', "federated.clients=4", f'federated.partition="{partition}"',
                             "federated.alpha=0.3"])
    stream = build_stream(cfg.stream, cfg.seed)
    for e in range(2):
        train = client_indices(cfg, stream, e)
        labels = experience_labels(stream.train_stream[e])
        test_y = stream.test_tensors(e)[1]
        shares = client_test_indices(cfg, stream, e)
        joined = torch.cat(shares)
        assert len(joined) == len(set(joined.tolist())) == len(test_y)  # disjoint, the whole split
        for c in test_y.unique().tolist():
            trained = np.array([int((labels[idx] == c).sum()) for idx in train])
            tested = np.array([int((test_y[s] == c).sum()) for s in shares])
            expected = trained / trained.sum() * int((test_y == c).sum())
            assert np.all(np.abs(tested - expected) < 1)  # proportional, to the sample
            assert np.all(tested[trained == 0] == 0)  # never tested on a class it did not train on
    assert [torch.equal(a, b) for a, b in zip(shares, client_test_indices(cfg, stream, 1))] == [True] * 4


def test_the_flattened_shares_give_what_a_loop_over_the_shares_gives():
    gen = torch.Generator().manual_seed(0)
    correct = torch.rand(500, generator=gen) > 0.4
    order = torch.randperm(500, generator=gen)
    cuts = [0, 0, 7, 7, 120, 121, 400, 500]  # empty shares too
    shares = [order[a:b] for a, b in zip(cuts, cuts[1:])]
    looped = [correct[s].double().mean().item() if len(s) else np.nan for s in shares]
    np.testing.assert_allclose(ce.ShareIndex.of(shares).accuracies(correct), looped)
    assert ce.ShareIndex.of(shares).sizes.tolist() == [0, 7, 0, 113, 1, 279, 100]
