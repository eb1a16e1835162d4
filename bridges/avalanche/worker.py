"""The machinery that trains federated clients' rounds: one Avalanche strategy per process
(a *worker*, as in pfl-research), lent to each client in turn, and the pieces that make a small
client round cheap under Avalanche: a template that skips its per-round model and optimizer checks
once they can find nothing (``WorkerNaive``), tensor minibatches in place of Avalanche's loader
(``ShareBatches``), an evaluator that takes no part in training (``learners.SilentEvaluator``), a seeding
that skips CUDA where there is none (``seed_round``), and a replay memory that the client fills
at experience boundaries only (``ClientReplayBuffer``). What a client keeps between rounds lives
in its ``Context.state`` (``clients/state.py``); the round itself is ``clients/learner.py``'s.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from avalanche.core import SupervisedPlugin
from avalanche.training import Naive
from avalanche.training.determinism.rng_manager import RNGManager
from avalanche.training.plugins import ReplayPlugin
from avalanche.training.storage_policy import ExperienceBalancedBuffer

from lifelong.bridges.avalanche.checkpoint import buffer_state, load_buffer_state
from lifelong.bridges.avalanche.learners import SilentEvaluator, build_learner, resolve_device
from lifelong.bridges.avalanche.oneprompt import OnePromptPlugin
from lifelong.bridges.avalanche.plugin import RegularizerPlugin
from lifelong.bridges.avalanche.sample_dp import SampleDPPlugin, sample_dp_config
from lifelong.config import Config, ReplaySpec
from lifelong.tasks.models import build_stream_model
from lifelong.tasks.streams import Stream


def seed_round(seed: int) -> None:
    """Avalanche's ``RNGManager.set_random_seeds``, without its CUDA generators where CUDA is not
    available: there, torch defers each CUDA seed to an initialisation that never comes and
    formats a stack trace for it, a sizeable part of a small client round's fixed cost
    (``python -m bench federated``). Where CUDA is available, every generator is seeded."""
    for name, generator in RNGManager.random_generators.items():
        if name != "torch.cuda" or torch.cuda.is_available():
            generator["seed"](seed)


class LossMeter(SupervisedPlugin):
    checkpoint_stateless = True  # nothing of its own to checkpoint (bridges/avalanche/checkpoint.py)

    def __init__(self):
        super().__init__()
        self.total, self.count = 0.0, 0

    def after_training_iteration(self, strategy, **kwargs):
        n = len(strategy.mb_y)
        self.total += float(strategy.loss.detach()) * n
        self.count += n


class ShareBatches(SupervisedPlugin):
    """Feeds the strategy the client's share as tensor minibatches: a permutation from the
    round's seeded RNG, sliced into batches, as a bare PyTorch loop does.

    Written here because Avalanche has no batched path for in-memory tensors: its loader fetches
    and collates sample by sample through the dataset's index chain and builds task-balanced
    iterators every epoch, which on a client's small share costs a sizeable part of the round's
    training (``python -m bench federated``). Used only when no plugin brings its own loader
    (replay's, Opacus' Poisson sampling); it takes the place of the loader Avalanche would make
    (``WorkerNaive`` then makes none).
    """

    def __init__(self):
        super().__init__()
        self.tensors: tuple[torch.Tensor, ...] = ()

    def before_training_exp(self, strategy, **kwargs):
        strategy.dataloader = TensorBatches(self.tensors, strategy.train_mb_size)


class WorkerNaive(Naive):
    """Avalanche's ``Naive`` for a worker's strategy, which trains one client after another.

    Before every ``train()`` Avalanche adapts the model to the experience (growing dynamic
    modules for unseen tasks, marking the classes a head has seen), re-maps the optimizer onto
    the model's parameters, and builds a dataloader. A worker's model has every head of the
    stream, sized and masked for every task, from the start (``build_stream_model``), and the
    worker keeps its model, parameters and optimizer for life (Opacus swaps the optimizer only
    after the check and puts it back after training): once the first round has run those
    checks, later ones find nothing to add or change (tested: under ``Naive`` every later check
    leaves weights, masks, parameters and optimizer as they were, and the weights are the same
    bit for bit), yet cost ~0.5 ms a client round, a twentieth of a small round's training
    (``python -m bench federated``). So they run again only when the model, its parameters or
    the optimizer are other objects than last time; and the dataloader is not built when the
    share comes as tensor batches (``ShareBatches``), which replace it before it is read.

    The premise holds because every model the server sends carries the stream's full class masks
    (``active_units_T<t>``, set by ``build_stream_model``; clients return them as received, and
    FedAvg, user-level DP and the server optimizers keep a non-float tensor every client returned
    unchanged); a round on a model whose masks were cleared would, under ``Naive``, have them set
    again, here not.
    """

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self._checked: tuple = ()  # the model, optimizer and parameters the last check saw
        self.loader_replaced = any(isinstance(p, ShareBatches) for p in self.plugins)

    def check_model_and_optimizer(self, **kwargs):
        current = (self.model, self.optimizer, *self.model.parameters())
        if len(current) != len(self._checked) or any(a is not b for a, b in zip(current, self._checked)):
            super().check_model_and_optimizer(**kwargs)
            self._checked = (self.model, self.optimizer, *self.model.parameters())

    def make_train_dataloader(self, **kwargs):
        if not self.loader_replaced:
            super().make_train_dataloader(**kwargs)


@dataclass
class TensorBatches:
    tensors: tuple[torch.Tensor, ...]
    batch_size: int

    def __len__(self) -> int:
        return -(-len(self.tensors[0]) // self.batch_size)

    def __iter__(self):
        order = torch.randperm(len(self.tensors[0]))
        for i in range(0, len(order), self.batch_size):
            sel = order[i:i + self.batch_size]
            yield [a[sel] for a in self.tensors]


@dataclass
class Worker:
    """The training machinery (model, Avalanche strategy, plugins) for one config.

    Like a pfl-research worker, it is built once per process and lent to each client in turn:
    every round loads the client's weights, regulariser state and replay memory into it from
    the client's ``Context.state``, so it holds nothing of any client between rounds. Building
    an Avalanche strategy per client round would cost more than the round's training.
    """

    model: torch.nn.Module
    strategy: object
    regularizers: list[RegularizerPlugin]
    replay: ReplayPlugin | None
    meter: LossMeter
    #: Opacus DP-SGD under ``[privacy.sample]``; reset to the client's own accountant every round.
    dp: SampleDPPlugin | None = None
    #: OnePrompt (``oneprompt``); readied for each client's round from the round itself.
    oneprompt: OnePromptPlugin | None = None
    #: The share as tensor batches (None when replay or Opacus bring their own loader).
    batches: ShareBatches | None = None


class WorkerCache:
    """The worker of the config this process serves (one config at a time): built on first use,
    lent to every client round after."""

    def __init__(self):
        self._key: str | None = None
        self._worker: Worker | None = None

    def clear(self) -> None:
        self._key, self._worker = None, None

    def get(self, cfg: Config, stream: Stream) -> Worker:
        key = cfg.model_dump_json()
        if key != self._key:
            self._worker, self._key = build_worker(cfg, stream), key
        return self._worker


#: This process's worker (a federated client process, or the in-process backend's).
workers = WorkerCache()


def worker_for(cfg: Config, stream: Stream) -> Worker:
    return workers.get(cfg, stream)


def build_worker(cfg: Config, stream: Stream) -> Worker:
    """A worker for ``cfg``'s learner: its model (every head of the stream), Avalanche strategy
    (``WorkerNaive``) and plugins."""
    spec = cfg.strategies[0]
    model = build_stream_model(cfg.model, stream)  # the server's keys: every task's head already
    model.to(resolve_device(cfg.training.device))
    meter = LossMeter()
    evaluator = SilentEvaluator()  # the server evaluates, not the client
    memory = ClientReplayBuffer(spec.mem_size) if isinstance(spec, ReplaySpec) else None
    batches = ShareBatches() if memory is None and sample_dp_config(cfg) is None else None
    strategy = build_learner(spec, model, cfg.training, [meter, *([batches] if batches else [])], evaluator,
                             stream.n_classes, cfg.seed, consolidate=False, storage_policy=memory,
                             sample_dp=sample_dp_config(cfg), template=WorkerNaive)
    plugins = strategy.plugins
    return Worker(model, strategy, [p for p in plugins if isinstance(p, RegularizerPlugin)],
                  next((p for p in plugins if isinstance(p, ReplayPlugin)), None), meter,
                  next((p for p in plugins if isinstance(p, SampleDPPlugin)), None),
                  next((p for p in plugins if isinstance(p, OnePromptPlugin)), None), batches)



class ClientReplayBuffer(ExperienceBalancedBuffer):
    """Avalanche's experience-balanced reservoir buffer, updated only when the client says so.

    A client trains one experience over several rounds; Avalanche's ``ReplayPlugin`` would add the
    experience to the memory at the end of every round. The client adds it once, at the boundary.
    """

    def __init__(self, max_size: int):
        super().__init__(max_size, adaptive_size=True)
        self.frozen = True

    def post_adapt(self, agent, exp):
        if not self.frozen:
            super().post_adapt(agent, exp)

    def add_experience(self, exp) -> None:
        self.frozen = False
        try:
            super().post_adapt(None, exp)
        finally:
            self.frozen = True

    def state_dict(self) -> dict[str, torch.Tensor]:
        return buffer_state(self)

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        load_buffer_state(self, state)
