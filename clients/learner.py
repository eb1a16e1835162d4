"""One federated client's continual learner for one round.

The client holds a private share of every experience (``tasks/partition.py``) and trains an
Avalanche strategy — naive or replay, with the configured regularisers — on the share of the
experience the server is on. Its memory across rounds (regulariser state, replay buffer,
progress) is read from and written back to the node's persistent ``Context.state``
(``clients/state.py``); nothing about a client lives in this module.

Experience boundaries: an experience spans several rounds and a client is not sampled in every
round, so it cannot know which round is an experience's last. It consolidates lazily: the first
time it trains on a later experience it first consolidates the one it last trained on (Fisher,
anchors, frozen centers, replay memory), using the global model it has just received — the
federation's model at the end of that experience.

OnePrompt / OVOR (``bridges/avalanche/oneprompt.py``): in every round a sampled client runs OnePrompt's
training (phase A: prompt and head, cross-entropy with earlier tasks' classes masked) on its
share, from the global model; the backbone is frozen, so it returns the global backbone as it
received it. Phase B (VOR: the head alone, on its share's features and virtual outliers around
them) runs in the experience's last round only, after phase A, by the clients sampled in it;
FedAvg then averages their heads. The server says which round that is (``experience-end-round``
in the train message, ``clients/app.py``): lazy consolidation cannot serve here, since phase B
must shape the head before the experience's model is final and evaluated, and asking the server
keeps the round count — privacy accounting, checkpoints, progress — as for any other learner.
Which classes are current and which earlier comes from the stream's class order (public, the
same for every client), so OnePrompt keeps nothing of its own between rounds: a client whose
share lacks a class, or that was not sampled in an earlier experience, masks as every other does.
The reply says whether phase B ran (``vor-ran``, 1 or 0).

Sample-level DP (``[privacy.sample]``): the worker's strategy trains with Opacus' DP-SGD
(``bridges/avalanche/sample_dp.py``); each client is its own privacy unit, so before every round the
worker's DP plugin is reset to *this* client's accountant history, read from its
``Context.state``, and the history with the round's steps is written back with the rest. The
reply carries the client's epsilon, composed over every round it trained in
(``sample-epsilon``, for ``privacy.sample.delta``). Its weights are a DP-SGD output (the L2
penalty's gradient, added after the noise, reads only weights that are themselves DP outputs or
public); its training loss is not, so the client does not send it (NaN). The share size it sends
(FedAvg's weight; also implied by the sample rate) is treated as public, as Opacus does.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch
from avalanche.core import SupervisedPlugin
from avalanche.training import Naive
from avalanche.training.determinism.rng_manager import RNGManager
from avalanche.training.plugins import EvaluationPlugin, ReplayPlugin
from flwr.app import RecordDict

from lifelong.clients import state as st
from lifelong.config import Config, ReplaySpec
from lifelong.bridges.avalanche.learners import build_learner, quiet_avalanche_deprecations, resolve_device
from lifelong.bridges.avalanche.oneprompt import OnePromptPlugin, seen_classes
from lifelong.bridges.avalanche.plugin import RegularizerPlugin, build_regularizer
from lifelong.bridges.avalanche.sample_dp import SampleDPPlugin, sample_dp_config
from lifelong.tasks.models import build_stream_model
from lifelong.tasks.partition import experience_labels, experience_seed, partition
from lifelong.tasks.streams import Stream, build_stream, experience_share

#: Reply metric: the client's sample-level epsilon so far (under ``[privacy.sample]`` only).
SAMPLE_EPSILON = "sample-epsilon"
#: Reply metric: 1 when OnePrompt's VOR phase ran in the round, else 0 (``oneprompt`` only).
VOR_RAN = "vor-ran"

# Read-only data, cached per process: a stream's client split depends only on the config.
_SHARES: dict[tuple, list[torch.Tensor]] = {}
# Clients' shares of one experience as Avalanche experiences (read-only too: a training round
# reads its share, never changes it), built once per process and experience, not every round.
_SHARE_EXPERIENCES: dict[tuple, tuple[Stream, dict[int, object]]] = {}


def client_indices(cfg: Config, stream: Stream, experience: int) -> list[torch.Tensor]:
    """Every client's sample indices in ``experience`` (the same in every process)."""
    key = _split_key(cfg, experience)
    if key not in _SHARES:
        fed = cfg.federated
        labels = experience_labels(stream.train_stream[experience])
        _SHARES[key] = partition(labels, fed.clients, fed.partition, fed.alpha, fed.shards_per_client,
                                 seed=experience_seed(cfg.seed, experience))
    return _SHARES[key]


def client_share(cfg: Config, stream: Stream, experience: int, partition_id: int):
    """Client ``partition_id``'s share of ``experience``, as an Avalanche experience."""
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


def round_seed(seed: int, server_round: int, partition_id: int) -> int:
    """Each client's randomness in each round: the same whichever backend runs it."""
    return int(np.random.SeedSequence([seed, server_round, partition_id]).generate_state(1)[0] % 2**31)


def seed_round(seed: int) -> None:
    """Avalanche's ``RNGManager.set_random_seeds``, without its CUDA generators where CUDA is not
    available: there, torch defers each CUDA seed to an initialisation that never comes and
    formats a stack trace for it, a sizeable part of a small client round's fixed cost
    (``python -m bench federated``). Where CUDA is available, every generator is seeded."""
    for name, generator in RNGManager.random_generators.items():
        if name != "torch.cuda" or torch.cuda.is_available():
            generator["seed"](seed)


def noise_seed(seed: int, server_round: int, partition_id: int) -> int:
    """The seed of a client's DP-SGD noise in a round: another stream than :func:`round_seed`'s,
    so the noise is not drawn from the same sequence as the Poisson batches."""
    return int(np.random.SeedSequence([seed, server_round, partition_id, 1]).generate_state(1)[0] % 2**31)


class _LossMeter(SupervisedPlugin):
    checkpoint_stateless = True  # nothing of its own to checkpoint (bridges/avalanche/checkpoint.py)

    def __init__(self):
        super().__init__()
        self.total, self.count = 0.0, 0

    def after_training_iteration(self, strategy, **kwargs):
        n = len(strategy.mb_y)
        self.total += float(strategy.loss.detach()) * n
        self.count += n


class _SilentEvaluator(EvaluationPlugin):
    """An evaluator that takes no part in training callbacks.

    Avalanche's template needs an ``EvaluationPlugin``, but a client computes no Avalanche metrics
    (the server evaluates the global model). The stock plugin forwards every ``before_*`` and
    ``after_*`` callback to its metrics and, even with none, first builds a logging view of the
    experience: about a tenth of a small client round (measured with cProfile on the bench
    workload). Here callbacks resolve to a no-op; everything else is the stock plugin.
    """

    def __getattribute__(self, item: str):
        if item.startswith(("before_", "after_")):
            return _no_callback
        return super().__getattribute__(item)


def _no_callback(strategy, **kwargs) -> None:
    return None


class _ShareBatches(SupervisedPlugin):
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
        strategy.dataloader = _TensorBatches(self.tensors, strategy.train_mb_size)


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
    share comes as tensor batches (``_ShareBatches``), which replace it before it is read.

    The premise holds because every model the server sends carries the stream's full class masks
    (``active_units_T<t>``, set by ``build_stream_model``; clients return them as received, and
    FedAvg, user-level DP and the server optimizers keep a non-float tensor every client returned
    unchanged); a round on a model whose masks were cleared would, under ``Naive``, have them set
    again, here not.
    """

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self._checked: tuple = ()  # the model, optimizer and parameters the last check saw
        self.loader_replaced = any(isinstance(p, _ShareBatches) for p in self.plugins)

    def check_model_and_optimizer(self, **kwargs):
        current = (self.model, self.optimizer, *self.model.parameters())
        if len(current) != len(self._checked) or any(a is not b for a, b in zip(current, self._checked)):
            super().check_model_and_optimizer(**kwargs)
            self._checked = (self.model, self.optimizer, *self.model.parameters())

    def make_train_dataloader(self, **kwargs):
        if not self.loader_replaced:
            super().make_train_dataloader(**kwargs)


@dataclass
class _TensorBatches:
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
class _Worker:
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
    meter: _LossMeter
    #: Opacus DP-SGD under ``[privacy.sample]``; reset to the client's own accountant every round.
    dp: SampleDPPlugin | None = None
    #: OnePrompt (``oneprompt``); readied for each client's round from the round itself.
    oneprompt: OnePromptPlugin | None = None
    #: The share as tensor batches (None when replay or Opacus bring their own loader).
    batches: _ShareBatches | None = None


_WORKERS: dict[str, _Worker] = {}


def worker_for(cfg: Config, stream: Stream) -> _Worker:
    key = cfg.model_dump_json()
    if key not in _WORKERS:
        spec = cfg.strategies[0]
        model = build_stream_model(cfg.model, stream)  # the server's keys: every task's head already
        model.to(resolve_device(cfg.training.device))
        meter = _LossMeter()
        with warnings.catch_warnings():  # "no loggers": the server evaluates, not the client
            warnings.simplefilter("ignore", UserWarning)
            evaluator = _SilentEvaluator(loggers=[])
        memory = st.ClientReplayBuffer(spec.mem_size) if isinstance(spec, ReplaySpec) else None
        batches = _ShareBatches() if memory is None and sample_dp_config(cfg) is None else None
        strategy = build_learner(spec, model, cfg.training, [meter, *([batches] if batches else [])], evaluator,
                                 stream.n_classes, cfg.seed, consolidate=False, storage_policy=memory,
                                 sample_dp=sample_dp_config(cfg), template=WorkerNaive)
        _WORKERS.clear()  # one config at a time per process
        plugins = strategy.plugins
        _WORKERS[key] = _Worker(model, strategy, [p for p in plugins if isinstance(p, RegularizerPlugin)],
                                next((p for p in plugins if isinstance(p, ReplayPlugin)), None), meter,
                                next((p for p in plugins if isinstance(p, SampleDPPlugin)), None),
                                next((p for p in plugins if isinstance(p, OnePromptPlugin)), None), batches)
    return _WORKERS[key]


def frozen_keys(cfg: Config, stream: Stream) -> frozenset[str]:
    """The state-dict keys of the parameters a config's learner never trains (``freeze_backbone``,
    OnePrompt's backbone): every client returns them exactly as it received them.

    Read from the ``requires_grad`` of the very model the clients train (``worker_for``), so it
    cannot disagree with them; it depends on the config alone, never on data, so the server may
    use it freely (user-level DP leaves these keys out of the private update). Buffers are never
    listed: BatchNorm's running statistics move with the data even under a frozen backbone.
    """
    model = worker_for(cfg, stream).model
    # (remove_duplicate=False: a tied parameter is frozen under each of its state-dict names)
    return frozenset(k for k, p in model.named_parameters(remove_duplicate=False) if not p.requires_grad)


class ClientLearner:
    """Client ``partition_id``'s learner for a round: a worker loaded with the client's state."""

    def __init__(self, cfg: Config, partition_id: int, state: RecordDict):
        self.cfg, self.pid, self.state = cfg, partition_id, state
        self.spec = cfg.strategies[0]
        self.stream = build_stream(cfg.stream, cfg.seed)
        self.device = resolve_device(cfg.training.device)

    @property
    def keeps_state(self) -> bool:
        """Whether a later round reads what this learner leaves in ``Context.state``: regulariser
        state, replay memory, a privacy accountant, and the progress that says when to
        consolidate them. A plain fine-tuner (naive, no plugins) reads nothing back, so it has
        nothing to save to disk (``clients/state_store.py``)."""
        return bool(self.spec.plugins) or isinstance(self.spec, ReplaySpec) or self.cfg.privacy.sample is not None

    def share(self, experience: int):
        return client_share(self.cfg, self.stream, experience, self.pid)

    def train_round(self, weights: dict[str, torch.Tensor], experience: int, server_round: int,
                    boundary: dict[str, torch.Tensor] | None = None, ends_experience: bool = False,
                    copy: bool = True) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        """Train on this client's share of ``experience``; returns the new weights and metrics.

        ``boundary``: the global model at the end of the previous experience, which the client
        consolidates with (else with ``weights``: a client sampled late in an experience would
        anchor its Fisher and L2 anchors to a model already trained on the next one).
        ``ends_experience``: the server's word that this is the experience's last round (OnePrompt
        runs its VOR phase then). The client's state changes only if the round succeeds: a failed
        round leaves it as it was. ``copy=False`` returns the worker model's own tensors, which the
        worker's next round overwrites: for a caller that encodes them at once (the ClientApp).
        """
        worker = worker_for(self.cfg, self.stream)
        staged = RecordDict()
        try:
            new, metrics = self._train_round(worker, weights, experience, server_round, boundary, staged,
                                             ends_experience)
        except BaseException:
            _WORKERS.clear()  # a failed round may leave hooks or half-loaded state: rebuild next time
            raise
        for key in list(staged.keys()):
            self.state[key] = staged[key]
        return {k: v.clone() if copy else v for k, v in new.items()}, metrics

    def _train_round(self, worker: _Worker, weights, experience: int, server_round: int, boundary,
                     staged: RecordDict, ends_experience: bool):
        cfg, stream, model = self.cfg, self.stream, worker.model
        model.load_state_dict(boundary if boundary is not None else weights)
        # Seeded after the worker exists (building one draws from the RNG): a client's round
        # draws the same batches whichever process runs it, first or hundredth.
        seed_round(round_seed(cfg.seed, server_round, self.pid))

        regularizers = [build_regularizer(p, stream.n_classes) for p in self.spec.plugins]
        for i, reg in enumerate(regularizers):
            saved = st.read_tensors(self.state, st.reg_key(i))
            if saved is not None:
                reg.load_state_dict(saved)
            worker.regularizers[i].regularizer = reg
        memory = None
        if worker.replay is not None:
            memory = st.ClientReplayBuffer(self.spec.mem_size)
            saved = st.read_tensors(self.state, st.REPLAY)
            if saved:
                memory.load_state_dict(saved)
            worker.replay.storage_policy = memory

        progress = st.read_progress(self.state)
        consolidating = progress["consolidated"] < progress["trained"] < experience
        if consolidating:
            if regularizers or memory is not None:
                self._consolidate(progress["trained"], model, regularizers, memory, staged)
            progress["consolidated"] = progress["trained"]
            if memory is not None:
                st.write_tensors(staged, st.REPLAY, memory.state_dict())
        # Back to the round's weights if the model held the boundary or ran to consolidate a
        # regulariser (else it holds them already: filling a replay memory reads no model).
        if boundary is not None or (consolidating and regularizers):
            model.load_state_dict(weights)

        # A fresh local optimizer every round (momentum and Adam moments do not carry over).
        worker.strategy.optimizer.state.clear()
        worker.meter.total, worker.meter.count = 0.0, 0
        if worker.dp is not None:  # this client's privacy budget, not the previous client's
            worker.dp.reset(st.read_accountant(self.state), noise_seed(cfg.seed, server_round, self.pid))
        if worker.oneprompt is not None:
            worker.oneprompt.start_round(seen_classes(stream.classes_per_experience, experience),
                                         ends_experience, round_seed(cfg.seed, server_round, self.pid))
        share = self.share(experience)
        if worker.batches is not None:
            indices = client_indices(cfg, stream, experience)[self.pid]
            worker.batches.tensors = tuple(a[indices] for a in stream.train_tensors(experience))
        with quiet_avalanche_deprecations():
            # Opacus' backward hooks on the first layer, whose input needs no gradient: harmless
            # (per-sample gradients come from the output's), but PyTorch says so every round.
            warnings.filterwarnings("ignore", message=".*Full backward hook is firing.*")
            worker.strategy.train(share, eval_streams=[], num_workers=0)

        for i, reg in enumerate(regularizers):  # e.g. center loss moves its centers while training
            st.write_tensors(staged, st.reg_key(i), reg.state_dict())
        st.write_progress(staged, experience, progress["consolidated"])
        metrics = {"num-examples": len(share.dataset),
                   "train-loss": worker.meter.total / max(worker.meter.count, 1),
                   "partition-id": self.pid, "experience": experience}
        if worker.oneprompt is not None:
            metrics[VOR_RAN] = int(bool(worker.oneprompt.last_vor))
        if worker.dp is not None:
            st.write_accountant(staged, worker.dp.engine.accountant.history)
            metrics[SAMPLE_EPSILON] = worker.dp.reports[-1].epsilon
            metrics["train-loss"] = float("nan")  # computed on the data without noise (docstring)
        return {k: v.detach().cpu() for k, v in model.state_dict().items()}, metrics

    def _consolidate(self, experience: int, model, regularizers, memory, staged: RecordDict) -> None:
        share = self.share(experience)
        classes = sorted(int(c) for c in share.classes_in_this_experience)
        data = share.dataset.eval()
        loader = torch.utils.data.DataLoader(data, batch_size=self.cfg.training.batch_size, shuffle=False)
        for reg in regularizers:
            reg.before_experience(model, classes)
            reg.after_experience(model, ((b[0].to(self.device), b[1].to(self.device), b[-1].to(self.device))
                                         for b in loader))
            st.write_tensors(staged, st.reg_key(regularizers.index(reg)), reg.state_dict())
        if memory is not None:
            memory.add_experience(share)
