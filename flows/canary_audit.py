"""Empirical audit of a federated config's user-level DP guarantee with canary clients, in one run.

Steinke, Nasr & Jagielski, "Privacy Auditing with One (1) Training Run" (NeurIPS 2023); the
canaries and the bound: ``privacy/canary.py``. ``run_canary_audit(cfg)`` runs the config's *server*
— the same strategy a federated run builds (``flows.federated.server_strategy``: the sampling,
clipping mode and bound, allocation, noise, fixed denominator and server optimizer) — for the
config's number of rounds (experiences × rounds) over a population of the config's clients plus
the included canaries, each of which sends its direction scaled to the clip bound every round it
is sampled. The config's own clients send random updates of norm C: what is audited is the
implementation of the guarantee, which holds for *any* client updates, not the training, so no
data is read and a 25-round audit takes seconds.

The claimed epsilon is the accountant's (``privacy/accounting.py``, PLD) for this population,
cohort, rounds and delta — calibrated to ``privacy.target_epsilon`` when the config gives one.
A stated larger population (``privacy.population``) cannot be audited in simulation: its epsilon
is for a deployment that does not run here, so the audit claims and checks the simulated one.
Verdict: *consistent* when the empirical lower bound does not exceed the claim; otherwise the
implementation leaks more than the accountant says (a bug, or an accounting assumption the
implementation breaks), at confidence 1 − significance.

MLflow: one run (``privacy-audit-canaries``) with the numbers as metrics, every canary's score and
inclusion (``canary_scores.json``) and the two score histograms (``canary_scores.png``).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import numpy as np
import torch
from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict

from lifelong import tracking
from lifelong.bridges.flower import protocol
from lifelong.bridges.flower.dp_fedavg import private_keys
from lifelong.bridges.flower.records import from_state_dict, to_state_dict
from lifelong.clients.inprocess import InProcessGrid
from lifelong.clients.learner import frozen_keys
from lifelong.config import Config
from lifelong.env import default_tracking_uri
from lifelong.flows.federated import initial_weights, server_strategy
from lifelong.privacy.accounting import UserLevelPrivacy
from lifelong.privacy.canary import canary_scores, draw_canaries, draw_inclusion, empirical_epsilon
from lifelong.privacy.clipping import clip_update
from lifelong.tasks.streams import build_stream

SCORES_FILE = "canary_scores.json"
FIGURE_FILE = "canary_scores.png"


class CanaryAuditError(ValueError):
    """A config or setting the canary audit cannot run; the message names it."""


@dataclass
class CanaryAuditResult:
    run_id: str
    tracking_uri: str
    canaries: int
    included: int
    clients: int
    rounds: int
    sampled: int
    noise_multiplier: float | None
    delta: float
    significance: float
    claimed_epsilon: float | None  # None: no DP, nothing claimed
    empirical_epsilon: float
    mean_score_in: float
    mean_score_out: float
    notes: list[str]

    @property
    def consistent(self) -> bool | None:
        return None if self.claimed_epsilon is None else self.empirical_epsilon <= self.claimed_epsilon


def check_canary_audit(cfg: Config, canaries: int, significance: float, certify: bool = False) -> list[str]:
    if certify and cfg.privacy.clipping == "off":
        raise CanaryAuditError('--certify: the config has no user-level DP (privacy.clipping = "off"), so the '
                               "accountant claims no epsilon and there is no bound to certify; add a [privacy] "
                               "section or drop --certify")
    if cfg.flow != "federated":
        raise CanaryAuditError(f'audit --privacy: the config\'s flow is "{cfg.flow}", not "federated"; the canary '
                               "audit checks user-level DP of federated rounds")
    if canaries < 20:
        raise CanaryAuditError(f"--canaries: {canaries} is too few for a bound (at least 20; the paper uses 1,000)")
    if not 0 < significance < 1:
        raise CanaryAuditError(f"--significance: must be in (0, 1), got {significance}")
    notes = []
    if cfg.privacy.population is not None:
        notes.append(f"privacy.population = {cfg.privacy.population}: the epsilon of a stated population cannot "
                     "be audited in simulation; the claim audited is the simulated population's")
    return notes


def audit_privacy_plan(cfg: Config, population: int, sampled: int, rounds: int) -> UserLevelPrivacy | None:
    """The accountant's plan for the audited population (no stated population: see the module doc)."""
    p = cfg.privacy
    if p.clipping == "off":
        return None
    common = {"cohort_size": sampled, "population": population, "rounds": rounds, "delta": p.delta,
              "count_noise_std": (p.clipped_count_stddev or sampled / 20) if p.adaptive_clipping else None}
    if p.target_epsilon is not None:
        return UserLevelPrivacy.from_target_epsilon(p.target_epsilon, **common)
    return UserLevelPrivacy(p.noise_multiplier, **common)


class AuditClients:
    """The audit's ClientApp: client ``i < n`` sends a random update of norm C (fresh each round),
    client ``n + j`` the ``j``-th included canary's direction times C."""

    def __init__(self, keys: list[str], shapes: list[torch.Size], n: int, canaries: torch.Tensor, clip: float,
                 seed: int):
        self.keys, self.shapes, self.n, self.canaries, self.clip, self.seed = keys, shapes, n, canaries, clip, seed
        self.sizes = [int(np.prod(s)) for s in shapes]

        self._global: tuple[int, dict] | None = None  # (round, decoded global model): one decode a round

    def __call__(self, msg: Message, context) -> Message:
        pid = int(context.node_config[protocol.NODE_PARTITION_ID])
        rnd = int(msg.content[protocol.CONFIG][protocol.SERVER_ROUND])
        if self._global is None or self._global[0] != rnd:
            self._global = (rnd, msg.content[protocol.ARRAYS].to_torch_state_dict())
        state = dict(self._global[1])
        if pid < self.n:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + rnd * 10_007 + pid)
            update = torch.randn(sum(self.sizes), generator=g)
            update *= self.clip / update.norm()
        else:
            update = self.clip * self.canaries[pid - self.n]
        for k, part, shape in zip(self.keys, update.split(self.sizes), self.shapes):
            state[k] = state[k] + part.view(shape).to(state[k].dtype)
        metrics = MetricRecord({protocol.NUM_EXAMPLES: 1, protocol.TRAIN_LOSS: 0.0, protocol.PARTITION_ID: pid,
                                protocol.EXPERIENCE: 0})
        return Message(RecordDict({protocol.ARRAYS: from_state_dict(state), protocol.METRICS: metrics}), reply_to=msg)


def run_canary_audit(cfg: Config, canaries: int = 1000, significance: float = 0.05,
                     log=sys.stderr) -> CanaryAuditResult:
    notes = check_canary_audit(cfg, canaries, significance)
    fed, p = cfg.federated, cfg.privacy
    stream = build_stream(cfg.stream, cfg.seed)
    rounds = stream.n_experiences * fed.rounds
    start = initial_weights(cfg)
    keys = private_keys(start, frozen_keys(cfg, stream))
    shapes = [start[k].shape for k in keys]
    dim = sum(int(np.prod(s)) for s in shapes)
    directions = draw_canaries(dim, canaries, cfg.seed)
    included = draw_inclusion(canaries, cfg.seed)
    population = fed.clients + int(included.sum())
    sampled = max(int(population * fed.fraction), 1)
    plan = audit_privacy_plan(cfg, population, sampled, rounds)
    claimed = plan.epsilon() if plan is not None else None
    strategy = server_strategy(cfg, plan, population, sampled, frozen_keys(cfg, stream))
    grid = InProcessGrid(AuditClients(keys, shapes, fed.clients, directions[included], p.clip, cfg.seed), population)
    print(f"[audit] {canaries} canaries ({int(included.sum())} included), {fed.clients} other clients, "
          f"{sampled} of {population} sampled a round, {rounds} rounds, model of {dim:,} private parameters; "
          + (f"claimed epsilon {claimed:.3g} at delta {p.delta:g}" if plan else "no DP"), file=log, flush=True)
    arrays = from_state_dict(start)
    for rnd in range(1, rounds + 1):
        messages = list(strategy.configure_train(rnd, arrays, ConfigRecord(), grid))
        new, _ = strategy.aggregate_train(rnd, list(grid.send_and_receive(messages)))
        if new is not None:
            arrays = new
        if rnd % max(1, rounds // 5) == 0 or rnd == rounds:
            print(f"[audit] round {rnd}/{rounds}", file=log, flush=True)
    final = to_state_dict(arrays)
    change = torch.cat([(final[k].float() - start[k].float()).flatten() for k in keys])
    # The auditor scores each canary by the change along its direction *as the server clipped it*
    # (per-layer modes rescale layers unequally).
    clipped = directions if p.clipping in ("off", "flat") else torch.stack([
        torch.cat([t.flatten() for t in clip_update([part.view(s) for part, s in zip(
            (p.clip * d).split([int(np.prod(s)) for s in shapes]), shapes)], p.clip, p.clipping,
            allocation=p.allocation).update]) for d in directions])
    scores = canary_scores(change, clipped)
    eps = empirical_epsilon(scores, included, p.delta, significance)
    result = CanaryAuditResult("", "", canaries, int(included.sum()), fed.clients, rounds, sampled,
                               plan.noise_multiplier if plan else None, p.delta, significance, claimed, eps,
                               float(scores[included].mean()), float(scores[~included].mean()), notes)
    result.run_id, result.tracking_uri = log_canary_audit(cfg, result, scores, included)
    return result


def log_canary_audit(cfg: Config, r: CanaryAuditResult, scores: np.ndarray, included: np.ndarray) -> tuple[str, str]:
    uri = cfg.tracking.uri or default_tracking_uri()
    client = tracking.client_for(uri)
    params = {**cfg.flat(), "audit.canaries": r.canaries, "audit.significance": r.significance}
    run_id = tracking.open_run(client, "privacy-audit-canaries", params, {"lifelong.flow": "audit"},
                               experiment=cfg.tracking.experiment)
    metrics = {"empirical_epsilon": r.empirical_epsilon, "mean_score_in": r.mean_score_in,
               "mean_score_out": r.mean_score_out, "canaries_included": float(r.included)}
    if r.claimed_epsilon is not None:
        metrics.update(claimed_epsilon=r.claimed_epsilon, noise_multiplier=r.noise_multiplier,
                       consistent=float(r.consistent))
    logger = tracking.MLflowLogger(run_id, client)
    logger.log_values(metrics, 0)
    logger.flush()
    client.log_dict(run_id, {"scores": scores.tolist(), "included": included.tolist(), "notes": r.notes},
                    SCORES_FILE)
    tracking.log_figure(client, run_id, scores_figure(scores, included, r), FIGURE_FILE)
    client.set_terminated(run_id)
    return run_id, uri


def scores_figure(scores: np.ndarray, included: np.ndarray, r: CanaryAuditResult):
    plt = tracking.pyplot()

    fig, ax = plt.subplots(figsize=(6, 3.5))
    bins = np.histogram_bin_edges(scores, bins=40)
    ax.hist(scores[~included], bins=bins, alpha=0.6, label="left out")
    ax.hist(scores[included], bins=bins, alpha=0.6, label="included")
    claim = "no DP" if r.claimed_epsilon is None else f"claimed ε {r.claimed_epsilon:.3g}"
    ax.set_title(f"canary scores: empirical ε ≥ {r.empirical_epsilon:.3g} ({claim})")
    ax.set_xlabel("projection of the model's change on the canary")
    ax.legend()
    fig.tight_layout()
    return fig
