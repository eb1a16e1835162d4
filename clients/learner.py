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

import numpy as np
import torch
from flwr.app import RecordDict

from lifelong.bridges.avalanche.learners import quiet_avalanche_deprecations, resolve_device
from lifelong.bridges.avalanche.oneprompt import seen_classes
from lifelong.bridges.avalanche.plugin import build_regularizer
from lifelong.bridges.avalanche.worker import ClientReplayBuffer, Worker, seed_round, worker_for, workers
from lifelong.bridges.flower import protocol
from lifelong.clients import state as st
from lifelong.config import Config, ReplaySpec
from lifelong.tasks.evaluation import correct_predictions
from lifelong.tasks.partition import client_share, client_tensors, client_test_indices
from lifelong.tasks.standardize import Standardize
from lifelong.tasks.streams import Stream, build_stream


def round_seed(seed: int, server_round: int, partition_id: int) -> int:
    """Each client's randomness in each round: the same whichever backend runs it."""
    return int(np.random.SeedSequence([seed, server_round, partition_id]).generate_state(1)[0] % 2**31)


def noise_seed(seed: int, server_round: int, partition_id: int) -> int:
    """The seed of a client's DP-SGD noise in a round: another stream than :func:`round_seed`'s,
    so the noise is not drawn from the same sequence as the Poisson batches."""
    return int(np.random.SeedSequence([seed, server_round, partition_id, 1]).generate_state(1)[0] % 2**31)


def frozen_keys(cfg: Config, stream: Stream) -> frozenset[str]:
    """The state-dict keys of the parameters a config's learner never trains (``freeze_backbone``,
    OnePrompt's backbone): every client returns them exactly as it received them.

    Read from the ``requires_grad`` of the very model the clients train (``worker_for``), so it
    cannot disagree with them; it depends on the config alone, never on data, so the server may
    use it freely (user-level DP leaves these keys out of the private update). Of the buffers, only
    the input standardisation's are listed (constants of the stream, ``tasks/standardize.py``):
    noise added to them would rescale every client's input; BatchNorm's running statistics move
    with the data even under a frozen backbone.
    """
    model = worker_for(cfg, stream).model
    # (remove_duplicate=False: a tied parameter is frozen under each of its state-dict names)
    frozen = {k for k, p in model.named_parameters(remove_duplicate=False) if not p.requires_grad}
    for name, module in model.named_modules():
        if isinstance(module, Standardize):
            frozen.update(f"{name}.{b}" for b, _ in module.named_buffers())
    return frozenset(frozen)


class ClientLearner:
    """Client ``partition_id``'s learner for a round: a worker loaded with the client's state."""

    def __init__(self, cfg: Config, partition_id: int, state: RecordDict):
        self.cfg, self.pid, self.state = cfg, partition_id, state
        self.spec = cfg.strategies[0]
        self.stream = build_stream(cfg.stream, cfg.seed)
        self.device = resolve_device(cfg.training.device)
        self._drawn: dict[int, tuple] = {}  # a population client's samples, per experience: drawn once

    @property
    def keeps_state(self) -> bool:
        """Whether a later round reads what this learner leaves in ``Context.state``: regulariser
        state, replay memory, a privacy accountant, and the progress that says when to
        consolidate them. A plain fine-tuner (naive, no plugins) reads nothing back, so it has
        nothing to save to disk (``clients/state_store.py``)."""
        return bool(self.spec.plugins) or isinstance(self.spec, ReplaySpec) or self.cfg.privacy.sample is not None

    def tensors(self, experience: int) -> tuple:
        """This client's (x, y, task) training samples of ``experience``; a generated population's
        are drawn once per learner (one round), not for each use."""
        if self.stream.population is None:
            return client_tensors(self.cfg, self.stream, experience, self.pid)
        if experience not in self._drawn:
            self._drawn[experience] = client_tensors(self.cfg, self.stream, experience, self.pid)
        return self._drawn[experience]

    def share(self, experience: int):
        samples = self.tensors(experience) if self.stream.population is not None else None
        return client_share(self.cfg, self.stream, experience, self.pid, samples)

    @property
    def evaluates_personal_model(self) -> bool:
        """A learner with local state reports its personalised model's accuracy at each experience's
        end; not under DP, where a per-client figure the mechanism does not cover must not leave the
        client (``privacy.clipping`` protects the update only, ``[privacy.sample]`` the training)."""
        return (self.keeps_state and self.cfg.privacy.sample is None and self.cfg.privacy.clipping == "off")

    def personal_accuracy(self, model: torch.nn.Module, experience: int) -> list[float]:
        """The locally trained model's accuracy on this client's own test share of each experience
        seen so far (the shares the server evaluates the global model on: ``tasks/client_eval.py``)."""
        out = []
        for i in range(experience + 1):
            idx = client_test_indices(self.cfg, self.stream, i)[self.pid]
            if not len(idx):
                out.append(float("nan"))
                continue
            x, y, t = (a[idx] for a in self.stream.test_tensors(i))
            hits = correct_predictions(model, x, y, t, self.cfg.training.eval_batch_size, self.device)
            out.append(float(hits.float().mean()))
        return out

    def train_round(self, weights: dict[str, torch.Tensor], experience: int, server_round: int,
                    boundary: dict[str, torch.Tensor] | None = None, ends_experience: bool = False,
                    copy: bool = True, report_personal: bool = False) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        """Train on this client's share of ``experience``; returns the new weights and metrics.

        ``boundary``: the global model at the end of the previous experience, which the client
        consolidates with (else with ``weights``: a client sampled late in an experience would
        anchor its Fisher and L2 anchors to a model already trained on the next one).
        ``ends_experience``: the server's word that this is the experience's last round (OnePrompt
        runs its VOR phase then). The client's state changes only if the round succeeds: a failed
        round leaves it as it was. ``copy=False`` returns the worker model's own tensors, which the
        worker's next round overwrites: for a caller that encodes them at once (the ClientApp).
        ``report_personal``: report the personalised model's accuracy in this round's reply even if
        it does not end the experience (the virtual clock, where a client's last round on an
        experience is not known in advance).
        """
        worker = worker_for(self.cfg, self.stream)
        staged = RecordDict()
        try:
            new, metrics = self._train_round(worker, weights, experience, server_round, boundary, staged,
                                             ends_experience, report_personal)
        except BaseException:
            workers.clear()  # a failed round may leave hooks or half-loaded state: rebuild next time
            raise
        for key in list(staged.keys()):
            self.state[key] = staged[key]
        return {k: v.clone() if copy else v for k, v in new.items()}, metrics

    def _train_round(self, worker: Worker, weights, experience: int, server_round: int, boundary,
                     staged: RecordDict, ends_experience: bool, report_personal: bool = False):
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
            memory = ClientReplayBuffer(self.spec.mem_size)
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
            worker.batches.tensors = self.tensors(experience)
        with quiet_avalanche_deprecations():
            # Opacus' backward hooks on the first layer, whose input needs no gradient: harmless
            # (per-sample gradients come from the output's), but PyTorch says so every round.
            warnings.filterwarnings("ignore", message=".*Full backward hook is firing.*")
            worker.strategy.train(share, eval_streams=[], num_workers=0)

        for i, reg in enumerate(regularizers):  # e.g. center loss moves its centers while training
            st.write_tensors(staged, st.reg_key(i), reg.state_dict())
        st.write_progress(staged, experience, progress["consolidated"])
        metrics = {protocol.NUM_EXAMPLES: len(share.dataset),
                   protocol.TRAIN_LOSS: worker.meter.total / max(worker.meter.count, 1),
                   protocol.PARTITION_ID: self.pid, protocol.EXPERIENCE: experience}
        if worker.oneprompt is not None:
            metrics[protocol.VOR_RAN] = int(bool(worker.oneprompt.last_vor))
        if worker.dp is not None:
            st.write_accountant(staged, worker.dp.engine.accountant.history)
            metrics[protocol.SAMPLE_EPSILON] = worker.dp.reports[-1].epsilon
            metrics[protocol.TRAIN_LOSS] = float("nan")  # computed on the data without noise (docstring)
        if (ends_experience or report_personal) and self.evaluates_personal_model:
            metrics[protocol.PERSONAL_ACC] = self.personal_accuracy(model, experience)
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
