"""The evaluator the continual flow and the federated worker give Avalanche: silent, and no part of
training."""

import warnings

import torch
from avalanche.training import Naive
from avalanche.training.determinism.rng_manager import RNGManager
from avalanche.training.plugins import EvaluationPlugin

from lifelong.bridges.avalanche.learners import SilentEvaluator
from lifelong.config import StreamConfig
from lifelong.tasks.streams import build_stream


def test_it_is_made_without_a_warning():
    # Avalanche warns "No loggers specified" for an evaluator without loggers (run_continual printed it
    # while the continual flow built SilentEvaluator(loggers=[])).
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        SilentEvaluator()


def test_a_strategy_trains_to_the_same_weights_as_with_avalanches_own_evaluator():
    stream = build_stream(StreamConfig(n_experiences=2), 0)

    def trained(evaluator) -> list[torch.Tensor]:
        RNGManager.set_random_seeds(0)
        model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))
        strategy = Naive(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                         train_mb_size=32, train_epochs=2, evaluator=evaluator)
        for exp in stream.train_stream:
            strategy.train(exp)
        return [p.detach().clone() for p in model.parameters()]

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the stock evaluator's "no loggers"
        stock = trained(EvaluationPlugin(loggers=[]))
    silent = trained(SilentEvaluator())
    assert all(torch.equal(a, b) for a, b in zip(stock, silent, strict=True))
