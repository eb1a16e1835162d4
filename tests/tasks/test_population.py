"""The generated population: each client's data is a function of its id and the seed, sizes are
heavy-tailed, each client has its own class mix, and the pooled splits are the panel's data."""

import numpy as np
import pytest
import torch

from lifelong.config import ConfigError, load_config
from lifelong.tasks.partition import client_share, client_tensors, client_test_indices
from lifelong.tasks.streams import build_stream


def pop_config(*extra):
    return load_config(None, ['flow="federated"', 'stream.name="population"', 'model.name="mlp"',
                              "federated.clients=100000", "federated.fraction=0.001", *extra])


@pytest.fixture(scope="module")
def stream():
    cfg = pop_config()
    return cfg, build_stream(cfg.stream, cfg.seed)


def test_a_clients_data_depends_on_its_id_and_the_seed_only(stream):
    cfg, s = stream
    a = client_tensors(cfg, s, 2, 77_777)
    b = client_tensors(pop_config("federated.clients=100", "federated.fraction=1"), s, 2, 77_777)  # its size: no matter
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    other = build_stream(pop_config("seed=1").stream, 1)
    assert not torch.equal(a[0], other.population.client_data(77_777, 2)[0][: len(a[0])])
    assert set(a[1].tolist()) <= set(s.classes_per_experience[2])  # class-incremental: its experience's classes
    assert a[0].shape[1] == 32 and s.input_shape == (32,)


def test_sizes_are_heavy_tailed_and_class_mixes_differ(stream):
    _, s = stream
    pop = s.population
    sizes = pop.sizes(range(5000))
    median, p99 = np.median(sizes), np.percentile(sizes, 99)
    assert 20 <= median <= 28 and p99 > 6 * median  # log-normal(sigma=1): p99 ≈ e^2.33 ≈ 10× the median
    top = np.sort(sizes)[::-1]
    assert top[: len(top) // 10].sum() > 0.3 * top.sum()  # the largest 10% of clients hold over 30% of the data
    counts = pop.class_counts(range(200), 0)  # experience 0: classes 0 and 1
    share0 = counts[:, 0] / np.maximum(counts.sum(1), 1)
    assert (share0 > 0.9).mean() > 0.15 and (share0 < 0.1).mean() > 0.15  # Dirichlet(0.5): many one-class clients


def test_the_pooled_splits_are_the_panels_data_and_each_panel_client_is_tested_on_its_own(stream):
    cfg, s = stream
    x, y, _ = s.test_tensors(1)
    shares = client_test_indices(cfg, s, 1)
    assert len(shares) == 100_000 and sum(len(i) for i in shares[100:]) == 0
    own = s.population.client_data(42, 1, "test")
    assert torch.equal(x[shares[42]], own[0]) and torch.equal(y[shares[42]], own[1])
    share = client_share(cfg, s, 1, 5)
    assert len(share.dataset) == s.population.profile(5)[0] and share.classes_in_this_experience == [2, 3]


def test_what_splits_a_pooled_stream_is_refused_for_a_population():
    with pytest.raises(ConfigError, match=r"federated.partition: a generated population gives each client its own"):
        pop_config('federated.partition="dirichlet"')
    with pytest.raises(ConfigError, match=r"stream.population.panel: the 100 clients .* federated.clients = 10"):
        pop_config("federated.clients=10", "federated.fraction=1")
    with pytest.raises(ConfigError, match=r"stream.population: only the population stream takes it"):
        load_config(None, ["stream.population.features=8"])
    with pytest.raises(ConfigError, match=r"stream.population.size_max: 10 is below size_median 24"):
        pop_config("stream.population.size_max=10")


def test_a_client_round_draws_the_clients_data_once(monkeypatch):
    """The tensor batches a plain learner trains on and the Avalanche share it is built around
    come from one draw of the client's samples (they were drawn twice)."""
    from flwr.app import RecordDict

    from lifelong.clients.learner import ClientLearner
    from lifelong.flows.federated import initial_weights
    from lifelong.tasks.population import Population

    cfg = pop_config('strategies=[{name="naive", plugins=[{name="ewc", lam=1.0}]}]',
                     "training.epochs=1")
    learner = ClientLearner(cfg, 7, RecordDict())  # (the stream, and its panel's pooled splits, built)
    draws = []
    original = Population.client_data

    def counted(self, client, experience, split="train"):
        draws.append((client, experience, split))
        return original(self, client, experience, split)

    monkeypatch.setattr(Population, "client_data", counted)
    learner.train_round(initial_weights(cfg), 0, 1, ends_experience=True)
    assert [d for d in draws if d[0] == 7] == [(7, 0, "train")]
