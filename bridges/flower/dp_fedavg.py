"""User-level DP for federated rounds, as a wrapper around a Flower Message-API strategy.

After Pelikan et al., "Enabling Differentially Private Federated Learning for Speech Recognition"
(see ``privacy/clipping.py`` for the reference code followed), in the shape of Flower's own
``DifferentialPrivacyServerSideFixedClipping`` (flwr 1.42, ``serverapp/strategy/
dp_fixed_clipping.py``), which offers flat clipping only: the wrapper keeps the global model each
round is sent with, clips every reply's *update* (reply − global) with any mode of
:func:`lifelong.privacy.clipping.clip_update`, and adds Gaussian noise once to the sum.

Two departures from wrapping FedAvg's weighted mean, both required by the DP analysis: clients
weigh equally (a weight by sample count would give a big client more than one clip bound of
influence), and the sum is divided by the *expected* cohort size, not by the number that replied
(a data-dependent denominator changes the sensitivity). The wrapped strategy still samples
clients and records their outcomes (``record_replies`` of :class:`ContinualFedAvg`) and makes the
server optimizer's step from the private mean (its ``server_step``); any other attribute is read
from it.

What is private: the float tensors a client's training can move — the parameters its learner
trains and the float buffers (BatchNorm's running statistics follow the data). Parameters the
learner never trains (``frozen``: a linear probe's backbone, OnePrompt's pretrained ViT) are left
out, and so are non-float entries (counters, masks), which cannot be clipped and noised: both keep
the global model's value, bit for bit, whatever a client sends. Which parameters are frozen follows
from the config alone (``lifelong.clients.learner.frozen_keys``), never from data, so leaving them out costs
no privacy; their update is identically zero anyway, and noising them would move a backbone meant
to stay fixed, while per-layer clipping would spend part of the bound on layers that never move.

Adaptive clipping (Andrew et al., NeurIPS 2021, Algorithm 1; ``privacy/clipping.py``): with
``adaptive`` set, every round also releases the noised fraction of replies whose update norm was
within the bound, and the bound moves geometrically toward the target quantile of the norms for
the next round. The update's noise multiplier must then be Theorem 1's ``z_delta`` (the caller
passes it: ``UserLevelPrivacy.update_noise_multiplier``), so both releases together cost what
``z`` alone would. Per-layer modes derive their layer bounds from the current C, so they scale
with it.

Per-client ledger (``privacy/ledger.py``; ``ledger`` set): every reply that enters the noised sum is
recorded as one Gaussian round (the *accounted* ``z``) for its client; a client whose next round
would exceed its budget is not sampled (its partition is known from an earlier reply), and a reply
from one that was sampled before the server knew who it was is dropped before aggregation, so its
data never reaches the released model. Both decisions read only participation counts, never data.
With ``client_records`` the clients keep their own record too (``clients/privacy_record.py``):
each message says which runs the ledger holds, each reply lists the rounds its client recorded in
other runs, and those are charged (once: as entries of the pseudo-run ``client-record``) before the
budget check, so a run that does not continue the ledger (``privacy.ledger_from``) cannot reset it.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from lifelong.bridges.flower import protocol
from lifelong.bridges.flower.records import from_state_dict, to_state_dict
from lifelong.privacy.clipping import clip_update, noisy_unclipped_fraction, private_mean, update_clip_bound
from lifelong.privacy.ledger import PrivacyLedger

log = logging.getLogger("lifelong.federated")
#: The ledger's run name for rounds a client reported from its own record (runs the ledger did not hold).
CLIENT_RECORD = "client-record"


@dataclass(frozen=True)
class AdaptiveClipping:
    """Andrew et al.'s settings: target quantile gamma, learning rate eta_C, count noise std sigma_b
    (their defaults, 0.5, 0.2 and cohort / 20, are the config's: ``[privacy]``)."""

    target_quantile: float
    learning_rate: float
    count_noise_std: float


def private_keys(state: Mapping[str, torch.Tensor], frozen: Collection[str] = ()) -> list[str]:
    """The keys of ``state`` in the private (clipped, noised) update: float tensors that are not
    ``frozen`` parameters. The rest keeps the global model's value (module docstring)."""
    unknown = sorted(set(frozen) - set(state))
    if unknown:
        raise ValueError(f"frozen keys {unknown} are not in the global model's state dict")
    return [k for k, v in state.items() if v.is_floating_point() and k not in frozen]


class UserLevelDP(Strategy):
    def __init__(self, inner, mode: str, clip: float, noise_multiplier: float, expected_cohort: int,
                 allocation: str = "uniform", seed: int = 0, adaptive: AdaptiveClipping | None = None,
                 frozen: Collection[str] = (), ledger: PrivacyLedger | None = None,
                 accounted_noise_multiplier: float | None = None, run_id: str = "",
                 client_records: bool = False):
        """``noise_multiplier``: the update's (``z_delta`` when ``adaptive``); ``clip``: the bound, the
        starting one when ``adaptive``; ``frozen``: the state-dict keys of the parameters the
        clients' learner never trains (left out of the private update); ``ledger``: the per-client
        account, charged ``accounted_noise_multiplier`` (default ``noise_multiplier``) a round;
        ``client_records``: the clients keep their own record, and report earlier runs' rounds."""
        self.inner, self.mode, self.clip, self.allocation = inner, mode, clip, allocation
        self.frozen = frozenset(frozen)
        self.noise_multiplier, self.expected_cohort, self.adaptive = noise_multiplier, expected_cohort, adaptive
        # Seeded: the same config and seed give the same noise (and the same metrics).
        self.generator = torch.Generator().manual_seed(seed)
        self._current: dict[str, torch.Tensor] | None = None
        self._private: list[str] = []  # the keys of this round's private update
        #: Per round: the fraction of replies whose update was clipped and their mean pre-clip norm.
        self.clip_stats: dict[int, dict[str, float]] = {}
        self.ledger, self.run_id = ledger, run_id
        self.client_records = client_records and ledger is not None
        self._all_at_limit = False
        self.accounted_z = noise_multiplier if accounted_noise_multiplier is None else accounted_noise_multiplier

    def __getattr__(self, name):  # round_offset, outcomes, boundary, ... live on the wrapped strategy
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)

    def __setattr__(self, name, value):
        if name in ("round_offset", "boundary"):
            setattr(self.inner, name, value)
        else:
            super().__setattr__(name, value)

    def summary(self) -> None:
        self.inner.summary()

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        self._current = dict(to_state_dict(arrays))
        # Here, not after the round: a frozen key the model lacks is refused before clients train.
        self._private = private_keys(self._current, self.frozen)
        if self.ledger is not None:  # the sampler skips the clients whose next round would exceed their budget
            rnd = self.inner.round_offset + server_round
            at_limit = {pid for pid in set(self.inner._partition_of.values())
                        if not self.ledger.can_take_part(pid, self.accounted_z)}
            if at_limit and not self.ledger.stops:
                log.warning("round %d: clients start reaching their privacy budgets. From here on the run-level "
                            "epsilon (privacy/epsilon) assumes a sampling that the stops reveal; each client's "
                            "guarantee is its ledger epsilon (privacy/client_epsilon_*)", rnd)
            for pid in sorted(at_limit - {c for _, c, _ in self.ledger.stops}):
                self.ledger.stop(rnd, pid, self.accounted_z)
                log.warning("round %d: client %d is no longer sampled: %s", rnd, pid, self.ledger.stops[-1][2])
            self.inner.excluded_partitions = at_limit
            if len(at_limit) >= self.inner.min_available_nodes and not self._all_at_limit:
                self._all_at_limit = True
                log.warning("round %d: every client is at its privacy budget: from here on no client is sampled "
                            "and the global model is kept", rnd)
        if self.client_records:
            config[protocol.DP_ACCOUNTED_Z] = self.accounted_z
            config[protocol.LEDGER_RUNS] = [self.run_id, *sorted(
                {e.run for e in self.ledger.entries} - {self.run_id, CLIENT_RECORD})]
        return self.inner.configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        rnd = self.inner.round_offset + server_round
        if self.ledger is not None and not self.inner._sent:  # every client at its budget (said once)
            self.inner.skipped_rounds.append(rnd)
            return None, None
        valid = self.inner.record_replies(server_round, replies)
        if valid is None:
            return None, None
        if self.ledger is not None:
            if self.client_records:
                self._charge_client_records(rnd, valid)
            valid = self._within_budget(rnd, valid)
            if len(valid) < self.inner.min_results:  # (min_results counts the replies that are used)
                self.inner.skipped_rounds.append(rnd)
                return None, None
        # Non-float buffers (counters, masks such as the ViT's `active`) cannot be clipped and
        # noised, so a client's values would reach the server unprotected (a batch counter reveals
        # a share's size); frozen parameters are not trained (an honest client sends them back as
        # it got them). Both keep the global model's value, whatever a client sends.
        keys = self._private
        clipped, norms, hit = [], [], 0
        for msg in valid:
            new = to_state_dict(msg.content[protocol.ARRAYS])
            update = [(new[k] - self._current[k]).float() for k in keys]
            result = clip_update(update, self.clip, self.mode, allocation=self.allocation
                                 if self.mode in ("per_layer", "per_layer_normalize") else None)
            clipped.append(result.update)
            norms.append(float(result.total_norm))
            hit += not result.within_bound
        mean = private_mean(clipped, self.noise_multiplier, self.clip, denominator=self.expected_cohort,
                            generator=self.generator)
        arrays = dict(self._current)
        arrays.update({k: (self._current[k].float() + d).to(self._current[k].dtype) for k, d in zip(keys, mean)})
        if self.ledger is not None:
            for msg in valid:
                m = msg.content[protocol.METRICS]
                self.ledger.record(int(m[protocol.PARTITION_ID]), self.run_id, int(m.get(protocol.EXPERIENCE, -1)),
                                   rnd, self.accounted_z)
        self.clip_stats[rnd] = {"clipped_fraction": hit / len(valid), "mean_update_norm": sum(norms) / len(norms),
                                "clip_bound": self.clip}
        if self.adaptive is not None:  # the next round's bound, from this round's noised count
            a = self.adaptive
            unclipped = noisy_unclipped_fraction([n <= self.clip for n in norms], self.expected_cohort,
                                                 a.count_noise_std, self.generator)
            self.clip = update_clip_bound(self.clip, unclipped, a.target_quantile, a.learning_rate)
        metrics = self.inner.train_metrics_aggr_fn([m.content for m in valid], self.inner.weighted_by_key)
        return self.inner.server_step(from_state_dict(arrays)), metrics

    def _charge_client_records(self, rnd: int, valid: list[Message]) -> None:
        """Charge the rounds each client reports from runs the ledger does not hold, beyond those
        it reported before (a client's record only grows, so the difference is what is new)."""
        for msg in valid:
            m = msg.content[protocol.METRICS]
            pid = int(m[protocol.PARTITION_ID])
            held = Counter(e.noise_multiplier for e in self.ledger.entries if e.client == pid and e.run == CLIENT_RECORD)
            new = Counter(float(z) for z in m.get(protocol.PRIOR_DP_ROUNDS, [])) - held
            for z in sorted(new.elements()):
                self.ledger.record(pid, CLIENT_RECORD, -1, rnd, z)
            if new:
                log.warning("round %d: client %d's own record holds %d DP rounds of runs this ledger did not hold; "
                            "charged: it has spent epsilon %.3g", rnd, pid, sum(new.values()), self.ledger.spent(pid))

    def _within_budget(self, rnd: int, valid: list[Message]) -> list[Message]:
        """The replies whose client can afford this round; the others are dropped, unread, and
        their clients stop being sampled."""
        kept = []
        for msg in valid:
            pid = int(msg.content[protocol.METRICS][protocol.PARTITION_ID])
            if self.ledger.can_take_part(pid, self.accounted_z):
                kept.append(msg)
            else:
                self.ledger.stop(rnd, pid, self.accounted_z)
                log.warning("round %d: client %d is at its privacy budget (%s); its update is dropped and it "
                            "is no longer sampled", rnd, pid, self.ledger.stops[-1][2])
        if not kept:
            log.warning("round %d: every client that replied is at its privacy budget: the global model is kept", rnd)
        return kept

    def server_state(self) -> dict:
        """The wrapped strategy's, the (adaptive) bound and the noise generator's state, so a resumed
        run draws the noise an unbroken one would; and the ledger, so it goes on with what was spent."""
        state = {**self.inner.server_state(), "clip": self.clip, "generator": self.generator.get_state()}
        if self.ledger is not None:
            state["ledger"] = self.ledger.to_json()
        return state

    def load_server_state(self, state: dict) -> None:
        self.inner.load_server_state(state)
        self.clip = float(state["clip"])
        self.generator.set_state(state["generator"])
        if self.ledger is not None and "ledger" in state:
            saved = PrivacyLedger.from_json(state["ledger"], budget=self.ledger.budget, budgets=self.ledger.budgets)
            self.ledger.restore(saved)

    def configure_evaluate(self, server_round, arrays, config, grid):
        return self.inner.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round, replies):
        return self.inner.aggregate_evaluate(server_round, replies)
