"""The federated continual-learning flow and its Flower ServerApp.

For each experience of the stream the server runs ``federated.rounds`` Flower rounds: it samples
clients, sends them the global model, aggregates their updates with FedAvg
(``bridges/flower/fedavg.py``; optionally user-level DP, ``bridges/flower/dp_fedavg.py``), steps the global
model with the server optimizer (``strategies/federated/server_optimizers.py``) and evaluates the new global model on every experience after every
round. Each client trains its own continual learner on its private share of the experience
(``clients/``).

Task-incremental streams (``stream.scenario = "task"``): the model is multi-head and FedAvg
needs one key set on the server and every client in every round, so the server's and the
clients' models are built with every task's head from the start
(``lifelong.tasks.models.build_stream_model``). Clients train with their share's task labels; the server
evaluates with the test splits' task labels, on the tasks seen so far only (a later task's head
is untrained: its accuracy-matrix cells are NaN, as in the continual flow).

One loop, :class:`ServerLoop` (:func:`serve`), drives the rounds over whatever ``Grid`` reaches the clients:

* ``inprocess``: our grid that runs the ClientApp in this process (``clients/inprocess.py``);
* ``ray``: Flower's simulation engine (``clients/launch.py``);
* a deployment: ``flwr run .`` submits ``app`` below to a SuperLink, whose SuperNodes run
  ``lifelong.clients.app:app`` (see the README); the ServerApp then opens its own MLflow run.

MLflow: one run per federated run, with the server's metrics per round (``round/*``, step = the
global round) and per experience (``matrix/*``, step = the experience), the accuracy matrix,
continual-evaluation metrics over rounds, a per-client table (``clients.json``: every sampled
client's outcome in every round, and for a client whose node came back empty, the round of the
saved state it went on from), the per-client class histograms and the final model. Under
sample-level DP (``[privacy.sample]``) every client reports its own epsilon; the server logs
their maximum and mean over each round's replies (``privacy/sample_epsilon_max``, ``_mean``) and
each reply's in the table's ``sample_epsilon`` column.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
import time
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from avalanche.training.determinism.rng_manager import RNGManager
from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp
from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from lifelong import registry, tracking
from lifelong.bridges.avalanche.learners import resolve_device
from lifelong.bridges.avalanche.oneprompt import seen_classes
from lifelong.bridges.flower import protocol
from lifelong.bridges.flower.dp_fedavg import AdaptiveClipping, UserLevelDP
from lifelong.bridges.flower.fedavg import ContinualFedAvg
from lifelong.bridges.flower.prompt_grid import PromptGrid
from lifelong.bridges.flower.records import from_state_dict, to_state_dict
from lifelong.checkpoints import ResumeError
from lifelong.clients import state_store
from lifelong.clients.learner import frozen_keys
from lifelong.config import Config, OnePromptSpec, load_config, strategy_label, validate_config
from lifelong.env import default_tracking_uri, in_process_flow_runs
from lifelong.flows import health, privacy_ledger
from lifelong.flows.checkpoints import (
    begin_attempt,
    checkpoint_file,
    load_round,
    restore_server,
    save_round,
)
from lifelong.flows.lineage import lineage_of
from lifelong.flows.privacy_ledger import build_ledger
from lifelong.privacy.accounting import PrivacyBudgetError, UserLevelPrivacy
from lifelong.privacy.ledger import PrivacyLedger
from lifelong.progress import Progress
from lifelong.strategies.federated.server_optimizers import ServerOptimizer
from lifelong.tasks import client_eval
from lifelong.tasks.evaluation import correct_predictions, evaluated_experiences
from lifelong.tasks.health import probe
from lifelong.tasks.metrics import (
    ContinualTrace,
    continual_summary,
    matrix_summary,
    worst_experience_accuracy,
)
from lifelong.tasks.models import build_stream_model
from lifelong.tasks.partition import (
    PartitionError,
    class_histograms,
    client_indices,
    experience_labels,
)
from lifelong.tasks.standardize import stats_params
from lifelong.tasks.streams import Stream, build_stream

#: Per-client histograms are plotted for at most this many clients (all are in the table).
MAX_PLOTTED_CLIENTS = 100
#: A generated population's histograms cover its first this many clients (each one's data is drawn to count it).
POPULATION_HISTOGRAMS = 1000
#: Round metrics reach MLflow in one batch at most this many seconds after they are computed
#: (at the end of the run, on failure, at once; what is not yet sent is in the round checkpoint).
FLUSH_EVERY_S = 5.0


@dataclass
class FederatedResult:
    run_id: str
    tracking_uri: str
    label: str
    matrix: np.ndarray
    summary: dict[str, float]
    rounds: int
    skipped_rounds: list[int] = field(default_factory=list)
    failures: int = 0
    timings: dict[str, float] = field(default_factory=dict)
    #: Final global weights (what the MLflow model holds).
    weights: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)
    #: What the run's cost line says instead of rounds and failures (a run on the virtual clock).
    cost_line: str | None = None


# --------------------------------------------------------------------------- checks and the split


def split_report(cfg: Config) -> list[np.ndarray]:
    """Split every experience across the clients (refusing impossible splits before any round)
    and return the clients × classes histograms."""
    stream = build_stream(cfg.stream, cfg.seed)
    hists = []
    for e in range(stream.n_experiences):
        if stream.population is not None:  # drawn per client: the first ones show the skew
            hists.append(stream.population.class_counts(range(min(cfg.federated.clients, POPULATION_HISTOGRAMS)), e))
            continue
        try:
            parts = client_indices(cfg, stream, e)
        except PartitionError as exc:
            raise PartitionError(f"{exc} (experience {e} of stream {stream.name})") from None
        hists.append(class_histograms(parts, experience_labels(stream.train_stream[e]), stream.n_classes))
    return hists


# --------------------------------------------------------------------------- the server loop


def privacy_plan(cfg: Config) -> UserLevelPrivacy | None:
    """The run's user-level privacy, calibrated before any round; an impossible budget is refused
    here (``PrivacyBudgetError`` with the numbers)."""
    p = cfg.privacy
    if p.clipping == "off":
        return None
    rounds = build_stream(cfg.stream, cfg.seed).n_experiences * cfg.federated.rounds
    common = {"cohort_size": cfg.federated.sampled, "population": cfg.federated.clients, "rounds": rounds,
              "delta": p.delta, "stated_population": p.population, "stated_cohort_size": p.cohort,
              "count_noise_std": count_noise_std(cfg)}
    try:
        if p.target_epsilon is not None:
            plan = UserLevelPrivacy.from_target_epsilon(p.target_epsilon, **common)
        else:
            plan = UserLevelPrivacy(p.noise_multiplier, **common)
    except PrivacyBudgetError as exc:
        if "noise multiplier" in str(exc) and p.noise_multiplier is not None:
            raise PrivacyBudgetError(f"privacy.noise_multiplier = {p.noise_multiplier:g}: {exc}") from None
        if "adaptive clipping" not in str(exc):
            raise
        which = ("privacy.clipped_count_stddev" if p.clipped_count_stddev is not None else
                 f"privacy.clipped_count_stddev (default: {cfg.federated.sampled} sampled clients / 20)")
        raise PrivacyBudgetError(f"{which}: {exc}; raise it, or use less noise (a smaller "
                                 "noise_multiplier or a larger target_epsilon)") from None
    build_ledger(cfg)  # budgets that cannot be read, an earlier run without a ledger: refused here
    if p.max_epsilon is not None and (eps := plan.epsilon()) > p.max_epsilon:
        raise PrivacyBudgetError(f"privacy.max_epsilon: the run would spend epsilon {eps:.3g} > {p.max_epsilon:g} "
                                 f"({plan.describe(eps)})")
    return plan


def server_strategy(cfg: Config, privacy: UserLevelPrivacy | None, clients: int, sampled: int,
                    frozen: Collection[str] = (), ledger: PrivacyLedger | None = None, run_id: str = "",
                    client_records: bool = False):
    """The server's strategy for ``clients`` nodes of which ``sampled`` train a round: FedAvg with
    the server optimizer, wrapped in user-level DP when ``privacy`` is given (also what the canary
    audit runs, flows/canary_audit.py)."""
    fed, p = cfg.federated, cfg.privacy
    server_optimizer = ServerOptimizer(fed.server_optimizer, **fed.server_hyperparameters)
    strategy = ContinualFedAvg(fed.fraction, fed.min_results, clients, cfg.seed, server_optimizer=server_optimizer)
    if privacy is None:
        return strategy
    adaptive = (AdaptiveClipping(p.target_quantile, p.clip_lr, privacy.count_noise_std)
                if p.adaptive_clipping else None)
    return UserLevelDP(strategy, p.clipping, p.clip, privacy.update_noise_multiplier, sampled, p.allocation,
                       cfg.seed, adaptive, frozen=frozen, ledger=ledger,
                       accounted_noise_multiplier=privacy.noise_multiplier, run_id=run_id,
                       client_records=client_records)


def count_noise_std(cfg: Config) -> float | None:
    """sigma_b of adaptive clipping (None without it): the configured one, or Andrew et al.'s
    recommendation, the expected cohort / 20."""
    p = cfg.privacy
    if not p.adaptive_clipping:
        return None
    return p.clipped_count_stddev if p.clipped_count_stddev is not None else cfg.federated.sampled / 20


def initial_weights(cfg: Config) -> dict[str, torch.Tensor]:
    from lifelong.flows.continual import pretrained_state

    stream = build_stream(cfg.stream, cfg.seed)
    RNGManager.set_random_seeds(cfg.seed)
    model = build_stream_model(cfg.model, stream)  # a task stream's: every task's head already
    if cfg.pretrain.epochs:
        model.load_state_dict(pretrained_state(cfg, stream))
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}


def public_state(cfg: Config, stream: Stream, state: dict[str, torch.Tensor],
                 experience: int) -> dict[str, torch.Tensor]:
    """The global model as the server evaluates and logs it while on ``experience``.

    OnePrompt's class mask ``active`` is not learned: it is the classes seen so far, from the
    stream's public class order, which every client sets on its own model for its round. FedAvg's
    majority of the clients' masks is that mask, but user-level DP keeps every non-float entry at
    the global model's value — the initial all-classes mask, under which the head would predict
    classes it has never seen — so the server sets it here, from the stream, in either case.
    """
    if isinstance(cfg.strategies[0], OnePromptSpec):
        active = torch.zeros_like(state["active"])
        active[seen_classes(stream.classes_per_experience, experience)] = True
        state = {**state, "active": active}
    return state


def serve(grid: Grid, cfg: Config, run_id: str, uri: str, progress: Progress | None = None,
          checkpoint: Path | None = None, resume: dict | None = None, deployed: bool = False) -> FederatedResult:
    """Run every experience's rounds over ``grid``, logging to MLflow run ``run_id``.

    ``checkpoint``: where to save the server's state after every round; the clients then save
    theirs, on their side (``clients/state_store.py``); ``resume``: such a checkpoint, to go on
    from the round after it, with each client's state of that round; ``deployed``: the clients
    are SuperNodes (real clients: they keep their own DP record by default).
    """
    return ServerLoop(cfg, run_id, uri, progress, checkpoint, deployed).run(grid, resume)


class ServerLoop:
    """The server's side of a federated continual run: for each experience, Flower's rounds over
    a grid; after each round, the global model evaluated on every experience seen, the values
    logged and the round checkpointed; at the end, the matrix, plots, the model and its registry
    version. Built once per run; :meth:`run` drives it."""

    def __init__(self, cfg: Config, run_id: str, uri: str, progress: Progress | None = None,
                 checkpoint: Path | None = None, deployed: bool = False):
        self.cfg, self.run_id, self.uri, self.progress, self.checkpoint = cfg, run_id, uri, progress, checkpoint
        self.deployed = deployed  # SuperNodes: real clients (privacy.client_records' default)
        self.client = tracking.client_for(uri)
        self.logger = tracking.MLflowLogger(run_id, self.client)
        self.stream = build_stream(cfg.stream, cfg.seed)
        self.fed, self.n_exp = cfg.federated, self.stream.n_experiences
        self.device = resolve_device(cfg.training.device)
        self.model = build_stream_model(cfg.model, self.stream).to(self.device)
        if isinstance(cfg.strategies[0], OnePromptSpec):
            self.model.use_prompt = True  # a switch, not a weight: the clients' plugin sets it on theirs
        #: The per-client privacy ledger (user-level DP only; flows/privacy_ledger.py).
        self.ledger: PrivacyLedger | None = None
        self.strategy, self.privacy, self.epsilons = self._strategy()
        self.trace, self.rows = ContinualTrace(), []
        #: Per-client continual evaluation (tasks/client_eval.py): after each experience, every
        #: client's accuracy on its own test share of each experience (clients × experiences).
        self.client_rows: list[np.ndarray] = []
        self.test_shares = client_eval.TestShares(cfg, self.stream)  # each experience's, per client
        self.config_json = json.dumps(cfg.model_dump(mode="json"))
        self.arrays = from_state_dict(initial_weights(cfg))
        self.done_rounds = 0
        #: The round each resume of this run went on from, oldest first (its clients' attempt).
        self.resume_rounds: list[int] = []
        self.last_evaluated = -1
        self.previous_state: dict[str, torch.Tensor] | None = None  # the last evaluated global model
        self.t0 = time.perf_counter()
        self.label = f"federated {strategy_label(cfg.strategies[0])}"
        #: What clients need to save and restore their own state (sent in every train message).
        self.client_keys: dict[str, object] = {}
        self.train_config: ConfigRecord | None = None  # the current experience's, sent every round

    def _strategy(self):
        """FedAvg with the server optimizer, wrapped in user-level DP when configured."""
        privacy = privacy_plan(self.cfg)
        if privacy is not None:
            self.ledger = build_ledger(self.cfg)
        records = self.cfg.privacy.client_records
        strategy = server_strategy(self.cfg, privacy, self.fed.clients, self.fed.sampled,
                                   frozen_keys(self.cfg, self.stream), self.ledger, self.run_id,
                                   client_records=self.deployed if records is None else records)
        # The params hold the keys as given (None: the optimizer's default); the tag, what was used.
        self.logger.set_tags({"server_optimizer": strategy.server_optimizer.describe()})
        if privacy is not None:
            self.logger.set_tags({"privacy": privacy.describe()})
        return strategy, privacy, list(privacy.epsilon_per_round()) if privacy is not None else []

    def _restore(self, resume: dict | None) -> None:
        if resume is not None:
            self.arrays, self.done_rounds = restore_server(resume, self.strategy, self.trace, self.rows,
                                                           self.fed.rounds, bool(self.cfg.strategies[0].plugins),
                                                           self.client_rows)
            if self.checkpoint is not None:  # this attempt, in the checkpoint before its clients save a row
                self.resume_rounds = begin_attempt(self.checkpoint, resume)
            self.logger.restore(resume.get("pending", []))  # values not yet in MLflow when it was saved
            if self.progress is not None:
                for e, row in enumerate(self.rows):
                    self.progress.experience_done(e, float(np.mean(row[: e + 1])))
            self.last_evaluated = self.done_rounds
        if self.checkpoint is not None:
            self.client_keys = {protocol.STATE_RUN: self.run_id, protocol.SAVED_ROUND: self.done_rounds}
            if resume is not None:
                self.client_keys[protocol.RESUME_ROUNDS] = self.resume_rounds
                last = {}
                for o in self.strategy.outcomes:
                    if o.status == "ok" and o.partition_id is not None and o.round <= self.done_rounds:
                        last[o.partition_id] = max(o.round, last.get(o.partition_id, 0))
                self.client_keys[protocol.TRAINED_PARTITIONS] = sorted(last)
                self.client_keys[protocol.TRAINED_ROUNDS] = [last[p] for p in sorted(last)]

    def run(self, grid: Grid, resume: dict | None = None) -> FederatedResult:
        self._restore(resume)
        fed = self.fed
        try:
            for e in range(self.done_rounds // fed.rounds, self.n_exp):
                self.strategy.round_offset = max(e * fed.rounds, self.done_rounds)
                self.train_config = ConfigRecord({
                    protocol.EXPERIENCE: e, protocol.ROUND_OFFSET: self.strategy.round_offset,
                    protocol.RUN_CONFIG: self.config_json, **self.client_keys,
                    protocol.EXPERIENCE_END: (e + 1) * fed.rounds})
                result = self.strategy.start(
                    grid, self.arrays, num_rounds=(e + 1) * fed.rounds - self.strategy.round_offset,
                    timeout=fed.round_timeout, train_config=self.train_config,
                    evaluate_fn=lambda r, a, e=e: self.evaluate_round(e, r, a))
                if len(result.arrays):  # empty when every round of the experience was skipped
                    self.arrays = result.arrays
                if self.cfg.strategies[0].plugins:  # regularisers consolidate with the experience's final model
                    self.strategy.boundary = self.arrays
                if self.progress is not None:
                    self.progress.experience_done(e, float(np.mean(self.rows[-1][: e + 1])))
        except BaseException:
            with contextlib.suppress(Exception):  # (if MLflow is what failed, the error says so)
                self.logger.flush()  # what was recorded before the failure is not lost
            raise
        return self.finish()

    def evaluate_round(self, experience: int, server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        """Flower's evaluate_fn: the global model after ``server_round`` of the experience."""
        rnd = self.strategy.round_offset + server_round
        if rnd <= self.last_evaluated:
            return None  # the model the previous round (or experience) ended with: evaluated
        self.last_evaluated = rnd
        refused = [o.reason for o in self.strategy.outcomes if o.round == rnd and state_store.REFUSED in o.reason]
        if refused:  # a client's saved state is corrupt or foreign: stop, never train on without it
            reason = refused[0][refused[0].index(state_store.REFUSED):]
            raise ResumeError(reason.removesuffix("'>"))
        state = public_state(self.cfg, self.stream, to_state_dict(arrays), experience)
        self.model.load_state_dict(state)
        ends_experience = rnd == (experience + 1) * self.fed.rounds
        # Per sample: each client's accuracy (at an experience's end) comes from the same pass.
        correct = self._predict(evaluated_experiences(self.stream, experience))
        accs = {i: int(c.sum()) / max(1, len(c)) for i, c in correct.items()}
        seen = {i: accs[i] for i in range(experience + 1)}
        self.trace.add(rnd, experience, seen)
        values = self._round_values(rnd, server_round, accs, seen)
        self.logger.log_values(values, rnd)
        if self.progress is not None and server_round:
            self.progress.epoch(experience, rnd - experience * self.fed.rounds - 1)
        if server_round:
            self._check_health(experience, rnd, state)
        self.previous_state = {k: v.detach().clone() for k, v in state.items()}
        every = self.fed.eval_every_rounds
        if every and server_round and rnd % every == 0:  # the clients' spread between experience ends
            self._client_spread(rnd, experience, correct)
        if ends_experience:  # the experience's last round: a matrix row, for the pool and per client
            self.rows.append([accs.get(i, float("nan")) for i in range(self.n_exp)])  # (NaN: untrained head)
            self.logger.log_values({**{f"matrix/acc_exp{i}": a for i, a in enumerate(self.rows[-1])},
                                    "avg_acc_seen": float(np.mean(self.rows[-1][: experience + 1]))}, experience)
            self._client_row(experience, correct)
            self._personal_spread(rnd, experience)
        if self.checkpoint is not None and server_round:
            # What MLflow does not have yet goes into the checkpoint: a resumed run logs it then.
            save_round(self.checkpoint, self.cfg, self.run_id, rnd, arrays, self.strategy, self.trace, self.rows,
                       self.logger.pending(), self.client_rows, self.resume_rounds)
            # From the next round on, clients may drop their state of rounds before this one.
            self.client_keys[protocol.SAVED_ROUND] = rnd
            self.train_config[protocol.SAVED_ROUND] = rnd  # the record Flower sends every round
        self.logger.flush_if_older(FLUSH_EVERY_S)
        return MetricRecord({"avg-acc-seen": values["round/avg_acc_seen"]})

    def _predict(self, experiences) -> dict[int, torch.Tensor]:
        """Whether the global model (loaded) gets each test sample of ``experiences`` right."""
        return {i: correct_predictions(self.model, *self.stream.test_tensors(i), self.cfg.training.eval_batch_size,
                                       self.device) for i in experiences}

    def _client_row(self, experience: int, correct: dict[int, torch.Tensor]) -> None:
        """Every client's accuracy on its own test share of each experience, and their spread."""
        row = np.full((self.fed.clients, self.n_exp), np.nan)
        for i, flags in correct.items():
            row[:, i] = client_eval.client_accuracies(flags, self.test_shares[i])
        self.client_rows.append(row)
        spread = client_eval.spread(client_eval.seen_accuracy(row, experience))
        self.logger.log_values({f"clients/acc_{k}": v for k, v in spread.items()}, experience)

    def _personal_spread(self, rnd: int, experience: int) -> None:
        """The clients of the experience's last round that evaluated their personalised (locally
        trained) model: the spread of its accuracy on their own seen experiences
        (``clients/personal_acc_*``), and its mean gain over the global model on the same shares
        (``clients/personal_gain_mean``). Only those clients: the others hold no such model now."""
        done = [o for o in self.strategy.outcomes if o.round == rnd and o.status == "ok" and o.personal]
        global_own = client_eval.seen_accuracy(self.client_rows[-1], experience)[[o.partition_id for o in done]]
        summary = client_eval.personal_summary([o.personal for o in done], global_own)
        if summary:
            self.logger.log_values({f"clients/{k}": v for k, v in summary.items()}, experience)

    def _client_spread(self, rnd: int, experience: int, correct: dict[int, torch.Tensor]) -> None:
        """Every ``eval_every_rounds``: each client's accuracy on its own test shares of the
        experiences seen so far, and their spread (``clients/round_acc_*``, step: the round)."""
        row = np.full((self.fed.clients, self.n_exp), np.nan)
        for i in range(experience + 1):
            row[:, i] = client_eval.client_accuracies(correct[i], self.test_shares[i])
        spread = client_eval.spread(client_eval.seen_accuracy(row, experience))
        self.logger.log_values({f"clients/round_acc_{k}": v for k, v in spread.items()}, rnd)

    def _check_health(self, experience: int, rnd: int, state: dict[str, torch.Tensor]) -> None:
        """Probe the global model on the experience being learned (the server holds its test
        split, not the clients' training data) every round; report a problem at the experience's
        last round — earlier rounds may still be on their way — or at once for non-finite weights."""
        from avalanche.models.utils import avalanche_forward

        update = None
        if self.previous_state is not None:
            diffs = [(state[k].float() - self.previous_state[k].float()).norm() for k in state
                     if state[k].is_floating_point()]
            update = float(torch.linalg.vector_norm(torch.stack(diffs))) if diffs else None
        x, y, t = self.stream.test_tensors(experience)
        found = probe(self.model, avalanche_forward, x, y, t, self.stream.classes_per_experience[experience],
                      f"exp{experience}, round {rnd}", update, self.device)
        mode = self.cfg.training.health_check
        if rnd == (experience + 1) * self.fed.rounds or found.nonfinite:
            health.report(self.client, self.run_id, self.logger, self.label, found, rnd, mode)
        elif mode != "off":
            self.logger.log_values(found.metrics(), rnd)

    def _round_values(self, rnd: int, server_round: int, accs: dict, seen: dict) -> dict[str, float]:
        values = {f"round/acc_exp{i}": a for i, a in accs.items()}
        values["round/avg_acc_seen"] = float(np.mean(list(seen.values())))
        done = [o for o in self.strategy.outcomes if o.round == rnd]
        if server_round:
            values["round/clients_ok"] = sum(o.status == "ok" for o in done)
            values["round/clients_failed"] = sum(o.status != "ok" for o in done)
            # (clients under sample-level DP send no loss: NaN)
            losses = [(o.train_loss, o.num_examples) for o in done if o.status == "ok" and np.isfinite(o.train_loss)]
            if losses:
                values["round/train_loss"] = sum(l * n for l, n in losses) / max(sum(n for _, n in losses), 1)
        if self.privacy is not None and server_round:
            values["privacy/epsilon"] = self.epsilons[rnd - 1]
            values.update({f"privacy/{k}": v for k, v in self.strategy.clip_stats.get(rnd, {}).items()})
            if self.ledger is not None:
                values.update(privacy_ledger.round_values(self.ledger, self.fed.clients))
        if eps := [o.sample_epsilon for o in done if o.status == "ok" and o.sample_epsilon is not None]:
            values["privacy/sample_epsilon_max"] = max(eps)
            values["privacy/sample_epsilon_mean"] = float(np.mean(eps))
        return values

    def finish(self) -> FederatedResult:
        """The run's summary, matrix, per-client table, trace, plots and model, in MLflow."""
        cfg, client, run_id, strategy, n_exp = self.cfg, self.client, self.run_id, self.strategy, self.n_exp
        matrix = np.array(self.rows)
        summary = matrix_summary(matrix)
        summary.update(continual_summary(self.trace, n_exp - 1))
        self.logger.log_values({f"final/{k}": v for k, v in summary.items()}, n_exp - 1)
        if len(self.client_rows) == n_exp:
            rows = self.client_rows
            accs = client_eval.spread(client_eval.seen_accuracy(rows[-1], n_exp - 1))
            forgetting = client_eval.spread(client_eval.client_forgetting(rows), worst="max")
            self.logger.log_values({**{f"final/clients_acc_{k}": v for k, v in accs.items()},
                                    **{f"final/clients_forgetting_{k}": v for k, v in forgetting.items()}}, n_exp - 1)
        # What the result cost, beside the final metrics (a resumed run reproduces those exactly):
        # server updates (rounds that aggregated) and the wall time since this process took over.
        self.logger.log_values({"cost/updates": n_exp * self.fed.rounds - len(strategy.skipped_rounds),
                                "cost/wall_s": time.perf_counter() - self.t0}, n_exp - 1)
        self.logger.flush()
        labels = [f"exp{i}" for i in range(n_exp)]
        label = self.label
        tracking.log_matrix(client, run_id, matrix, labels)
        client.log_dict(run_id, self._client_table(), "clients.json")
        if self.ledger is not None:
            privacy_ledger.log_ledger(client, run_id, self.ledger, self.fed.clients, cfg.tracking.log_plots)
        if len(self.client_rows) == n_exp:
            sizes = [self.test_shares[e].sizes.tolist() for e in range(n_exp)]
            client.log_dict(run_id, client_eval.matrix_table(self.client_rows, sizes), tracking.CLIENT_MATRIX_FILE)
            if cfg.tracking.log_plots:
                spreads = [client_eval.spread(client_eval.seen_accuracy(r, e)) for e, r in enumerate(self.client_rows)]
                tracking.log_figure(client, run_id, tracking.clients_figure(self.client_rows[-1], spreads, labels,
                                                                            f"{label}: per client"),
                                    "clients_accuracy.png")
        client.log_dict(run_id, {"points": [[p.iteration, p.experience, p.accuracies] for p in self.trace.points]},
                        tracking.TRACE_FILE)
        if cfg.tracking.log_plots:
            tracking.log_figure(client, run_id, tracking.matrix_figure(matrix, labels, label), "accuracy_matrix.png")
            points = [(p.iteration, p.experience, p.accuracies) for p in self.trace.points]
            tracking.log_figure(client, run_id, tracking.curve_figure(points, labels, label, xlabel="round"),
                                "continual_eval.png")
        weights = public_state(cfg, self.stream, to_state_dict(self.arrays), n_exp - 1)
        model_uri = None
        if cfg.tracking.log_model:
            self.model.load_state_dict(weights)
            model_uri = tracking.log_torch_model(run_id, self.model, self.uri)
        if health.conclude(client, run_id, cfg.training.health_check):
            registry.register_from_config(cfg, client, run_id, model_uri, flow="federated",
                                          stream=self.stream.name, strategy=strategy_label(cfg.strategies[0]),
                                          metrics=self._gate_metrics(summary, matrix),
                                          lineage=lineage_of(cfg, self.stream, matrix))
        elif model_uri is not None and cfg.tracking.register_model:
            print(f"[{label}] not registered: the model was unhealthy (`lifelong results {run_id}`)",
                  file=sys.stderr, flush=True)
        return FederatedResult(run_id, self.uri, label, matrix, summary, n_exp * self.fed.rounds,
                               list(strategy.skipped_rounds),
                               sum(o.status != "ok" for o in strategy.outcomes), weights=dict(weights))

    def _gate_metrics(self, summary: dict[str, float], matrix: np.ndarray) -> dict[str, float]:
        """What promotion gates may read (lifelong/gates.py): the summary, the worst experience, the
        clients' spread and, under user-level DP, the run's epsilon and the ledger's worst client."""
        out = {**summary, "worst_exp_accuracy": worst_experience_accuracy(matrix)}
        if len(self.client_rows) == self.n_exp:
            rows = self.client_rows
            out.update({f"clients_acc_{k}": v for k, v in
                        client_eval.spread(client_eval.seen_accuracy(rows[-1], self.n_exp - 1)).items()})
            out.update({f"clients_forgetting_{k}": v for k, v in
                        client_eval.spread(client_eval.client_forgetting(rows), worst="max").items()})
        if self.epsilons:
            out["epsilon"] = float(self.epsilons[-1])
        if self.ledger is not None:
            out["client_epsilon_max"] = float(self.ledger.percentiles(self.fed.clients)["max"])
        return out

    def _client_table(self) -> dict:
        """Every sampled client's outcome in every round (``clients.json``)."""
        outcomes = self.strategy.outcomes
        table = {"columns": ["round", "node_id", "partition_id", "status", "num_examples", "train_loss", "reason",
                             "restored_from"],
                 "data": [[o.round, o.node_id, o.partition_id, o.status, o.num_examples,
                           None if np.isnan(o.train_loss) else o.train_loss, o.reason, o.restored_from]
                          for o in outcomes]}
        if self.cfg.privacy.sample is not None:  # each reply's epsilon (None: failed or lost)
            table["columns"].append("sample_epsilon")
            for o, row in zip(outcomes, table["data"]):
                row.append(o.sample_epsilon)
        return table


# --------------------------------------------------------------------------- MLflow run


def open_federated_run(cfg: Config, uri: str, tags: dict[str, str] | None = None) -> str:
    client = tracking.client_for(uri)
    stream = build_stream(cfg.stream, cfg.seed)
    name = cfg.tracking.run_name or (
        f"{stream.name}-federated-{strategy_label(cfg.strategies[0])}-{cfg.federated.clients}clients")
    params = {**cfg.flat(), **stats_params(stream.input_stats if cfg.model.standardize_input else None)}
    run_id = tracking.open_run(client, name, params, {"lifelong.flow": "federated",
                                                          "lifelong.stream": stream.name,
                                                          "lifelong.backend": cfg.federated.backend,
                                                          **(tags or {})},
                               experiment=cfg.tracking.experiment)
    client.log_dict(run_id, cfg.model_dump(mode="json"), "config.json")
    return run_id


def log_split(cfg: Config, run_id: str, uri: str, hists: list[np.ndarray]) -> None:
    client = tracking.client_for(uri)
    client.log_dict(run_id, {f"exp{e}": h.tolist() for e, h in enumerate(hists)}, "class_histograms.json")
    if cfg.tracking.log_plots:
        shown = [h[:MAX_PLOTTED_CLIENTS] for h in hists]
        more = (f" (first {MAX_PLOTTED_CLIENTS} of {cfg.federated.clients})"
                if cfg.federated.clients > MAX_PLOTTED_CLIENTS else "")
        split = "population" if cfg.stream.name == "population" else f"{cfg.federated.partition} split"
        tracking.log_figure(client, run_id, tracking.histogram_figure(
            shown, f"{split}: samples per client and class{more}"), "class_histograms.png")


def run_server(grid: Grid, cfg: Config, uri: str, tags: dict[str, str] | None = None,
               resume: str | None = None) -> FederatedResult:
    """Open the MLflow run, log the split, serve every round (checkpointed), close the run
    (FAILED on error). ``resume``: an interrupted run's id, continued from its checkpoint."""
    hists = split_report(cfg)  # an impossible split is refused before a run is opened
    privacy_plan(cfg)  # and so is an impossible privacy budget
    client = tracking.client_for(uri)
    state = None
    if resume is None:
        run_id = open_federated_run(cfg, uri, tags)
    else:
        run_id, state = resume, load_round(checkpoint_file(resume), cfg)
        client.update_run(run_id, status="RUNNING")
        tracking.set_tags(client, run_id, tags or {})  # the Flower run that goes on with it
    with tracking.terminated(client, run_id):
        if resume is None:
            log_split(cfg, run_id, uri, hists)
        return serve(grid, cfg, run_id, uri, checkpoint=checkpoint_file(run_id), resume=state,
                     deployed=(tags or {}).get("lifelong.backend") == "deployment")


# --------------------------------------------------------------------------- Flower ServerApp

#: The ServerApp that ``flwr run .`` starts (``[tool.flwr.app.components]`` in pyproject.toml).
#: Its run config names the Lifelong config: ``config`` (a TOML path, TOML text, or a config as
#: JSON) and optional ``tracking-uri``; the config's ``[federated]`` section sets clients and
#: rounds. ``resume`` (an MLflow run id) continues that run from its checkpoint, which must be
#: under the ServerApp's ``LIFELONG_HOME``; the SuperNodes load their own state.
app = ServerApp()
#: The MLflow tag that links a run to the Flower run that produced it.
FLOWER_RUN_TAG = "flwr.run_id"


@app.main()
def server_main(grid: Grid, context: Context) -> None:
    cfg = config_from_run_config(context.run_config)
    uri = str(context.run_config.get("tracking-uri") or cfg.tracking.uri or default_tracking_uri())
    result = run_server(PromptGrid(grid), cfg, uri, {FLOWER_RUN_TAG: str(context.run_id), "lifelong.backend": "deployment"},
                        resume=str(context.run_config.get("resume", "") or "") or None)
    logging.getLogger("lifelong.federated").warning(
        "federated run finished: average accuracy %.3f, MLflow run %s (%s)",
        result.summary["avg_accuracy"], result.run_id, uri)


def config_from_run_config(run_config: dict) -> Config:
    source = str(run_config.get("config", "") or "")
    overrides = [s for s in str(run_config.get("set", "") or "").split(";") if s.strip()]
    if source.lstrip().startswith("{"):  # a resumed run's own config, as MLflow keeps it
        cfg = validate_config(json.loads(source))
    elif "\n" in source or (not source.endswith(".toml") and "=" in source):  # inline TOML
        import tomllib

        from lifelong.config import apply_override

        data = tomllib.loads(source)
        for item in overrides:
            apply_override(data, item)
        cfg = validate_config(data)
    else:
        path = Path(source) if source else None
        if path is not None and not path.is_absolute() and not path.exists():
            # Relative to the app's directory (the installed FAB), not to where the SuperLink runs.
            path = Path(__file__).resolve().parents[1] / path
        cfg = load_config(path, overrides)
    if cfg.flow != "federated":
        cfg = validate_config({**cfg.model_dump(mode="json"), "flow": "federated"})
    return cfg


# --------------------------------------------------------------------------- the Prefect flow


@task(cache_policy=NO_CACHE)
def split_step(cfg: Config) -> list[np.ndarray]:
    return split_report(cfg)


@task(cache_policy=NO_CACHE)
def open_run_step(cfg: Config, uri: str, hists: list[np.ndarray]) -> str:
    run_id = open_federated_run(cfg, uri)
    log_split(cfg, run_id, uri, hists)
    return run_id


@task(cache_policy=NO_CACHE)
def rounds_step(cfg: Config, run_id: str, uri: str, client_app) -> FederatedResult:
    """Every experience's rounds on the configured backend, checkpointed after every round.

    It always goes on from the run's last checkpoint when there is one: a resumed run's, or the
    one a failed attempt left, so a Prefect retry (``training.retries``) ends as an unbroken run.
    """
    from lifelong.clients.launch import inprocess_grid, simulate_with_ray

    path = checkpoint_file(run_id)
    resume = load_round(path, cfg) if path.exists() else None
    progress = Progress(f"fed {strategy_label(cfg.strategies[0])}", build_stream(cfg.stream, cfg.seed).n_experiences,
                        cfg.federated.rounds, step_name="round")
    try:
        def rounds(grid: Grid) -> FederatedResult:
            return serve(grid, cfg, run_id, uri, progress, checkpoint=path, resume=resume)

        if cfg.federated.backend == "inprocess":
            return rounds(inprocess_grid(cfg, client_app))
        return simulate_with_ray(cfg, rounds, client_app)
    finally:
        progress.close()


@flow(name="federated", validate_parameters=False)
def federated_flow(config: dict, client_app=None, resume: str | None = None) -> FederatedResult:
    """Federated continual learning: Flower rounds over every experience of the stream.
    ``resume``: an interrupted run's id, continued from its last round's checkpoint (on either
    backend: the clients load the state they saved themselves)."""
    cfg = config if isinstance(config, Config) else validate_config(config)
    t0 = time.perf_counter()
    uri = cfg.tracking.uri or default_tracking_uri()
    hists = split_step(cfg)
    privacy_plan(cfg)  # an impossible privacy budget is refused before a run is opened
    client = tracking.client_for(uri)
    if resume is None:
        run_id = open_run_step(cfg, uri, hists)
    else:
        run_id = resume
        load_round(checkpoint_file(run_id), cfg)  # a missing, corrupt or foreign one is refused here
        client.update_run(run_id, status="RUNNING")
    print(f"[lifelong] MLflow run {run_id}; if interrupted: lifelong clients launch --resume {run_id}",
          file=sys.stderr, flush=True)
    with tracking.terminated(client, run_id):
        result = rounds_step.with_options(retries=cfg.training.retries)(cfg, run_id, uri, client_app)
    result.timings["flow_s"] = time.perf_counter() - t0
    return result


def run_federated(cfg: Config, client_app=None, resume: str | None = None) -> FederatedResult:
    """Entry point for Python users and the CLI (``client_app``: a ClientApp to use instead of
    ``lifelong.clients.app.app``, e.g. one made to fail in a test; ``resume``: an interrupted run's id)."""
    if cfg.flow != "federated":
        cfg = validate_config({**cfg.model_dump(mode="json"), "flow": "federated"})
    with in_process_flow_runs():
        if cfg.clock is not None:  # clients that come and go on a virtual clock
            from lifelong.flows.virtual_clock import clock_flow

            return clock_flow(cfg, client_app, resume=resume)
        if cfg.federated.ray_address is not None:
            from lifelong.clients.launch import check_ray_address

            check_ray_address(cfg.federated.ray_address)  # before the run is opened
        return federated_flow(cfg, client_app, resume)
