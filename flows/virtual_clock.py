"""Federated continual learning with clients that come and go, on a seeded virtual clock.

The fleet (``tasks/fleet.py``) says who is online when, how fast each client computes and when
each experience reaches each client. This module is the server: an event loop over virtual time
(a heap of ``(hour, sequence, event)``), so simulated hours cost no wall time and the same seed
gives the same event log and the same metrics on any machine. Three server modes
(``clock.mode``):

* ``deadline`` — synchronous rounds as deployed at scale (Bonawitz et al., "Towards Federated
  Learning at Scale", SysML 2019): a round starts once at least ``cohort`` clients are online with
  data, with ``cohort * (1 + over_selection)`` of them (as many as there are), keeps the first
  ``cohort`` updates that arrive before the deadline, drops the late ones, and ends when the
  cohort is complete or at the deadline.
  Aggregation: FedAvg's sample-weighted mean.
* ``fedbuff`` — buffered asynchronous aggregation (Nguyen et al. 2022;
  ``strategies/federated/staleness.py``): ``concurrency`` clients train at any time, each from the
  server version current when it started; every ``buffer`` arrivals the server steps with their
  staleness-scaled mean delta.
* ``fedasync`` — every arrival is mixed in at once with a staleness-dependent weight (Xie et
  al. 2020).

A client trains through the real ClientApp (``lifelong.clients.app.app``, on an in-process grid),
so every client-side strategy (replay, EWC, L2, feature distillation, center loss) works as in
synchronous runs: a client trains on the newest experience it has reached, and its learner
consolidates the previous one when it moves on (with the model it holds then: there is no
common experience boundary on the server's side). A client that drops out mid-round, or goes
offline before it finishes, contributes nothing (and is not trained: its update would be thrown
away). A round's local training happens when it starts, in wall time; its result is applied when
its virtual finish time comes.

Evaluation, every ``clock.eval_every_hours`` and at the end: the global model on every experience
some client has reached (``clock/acc_exp*``), each client's accuracy on its own test shares of
the experiences *it* has reached, and their spread (``clock/clients_acc_*``), with the updates
applied and dropped, the staleness of the applied ones and the clients that took part, per
virtual hour; for learners with local state (no DP), the spread of each client's personalised
model's accuracy as it last reported it (every round: a client's last round on an experience is not
known in advance; ``clock/personal_acc_*``, ``clock/personal_gain_mean``). The accuracy matrix's
row ``k`` is the evaluation at ``(k + 1) * experience_hours``
(when experience ``k + 1`` starts arriving; the last at the end), so the summary (average
accuracy, forgetting) reads as in synchronous runs. MLflow also gets the event log
(``clock_events.json``), the per-client table (``clock_clients.json``) and ``clock.png``.

User-level DP (``[privacy]`` with a fixed ``noise_multiplier``): every applied update is clipped
(``privacy/clipping.py``) and the noise ``N(0, (z C)^2)`` added once per server step — to the sum of
a deadline round's cohort (over ``cohort``), of FedBuff's buffer (each clipped delta scaled by its
staleness, so still within C; over ``buffer``), or to FedAsync's single delta — and each client is
charged in the per-client ledger (``privacy/ledger.py``) for every update of its that reaches the
model; one that drops out, or comes too late, spends nothing. Selection here depends on who is
online, not on uniform sampling, so no amplification by sampling is claimed anywhere: the ledger's
per-client epsilon is the guarantee, and ``privacy.client_budget`` bounds it (a client at its
budget is no longer started). z cannot be calibrated to a target epsilon in advance (the number of
steps is not known), so ``target_epsilon`` is refused.

Checkpoints: at the first evaluation after every ``clock.checkpoint_every_hours`` (default 4) the
loop's whole state is saved
(``<LIFELONG_HOME>/checkpoints/<run>/clock.pt``: the event queue with the rounds in flight and
their replies, the global model, the buffer, the counters and logs, the random generators and
the ledger, and the values logged but not yet sent to MLflow, which the clock sends at the end in
one batch; beside it, ``clock-clients-K.pt``, the ``Context.state`` of every client that trained
since the previous checkpoint);
``lifelong clients launch --resume RUN`` goes on from it to the same final metrics as an unbroken
run (tested), logging nothing twice.

Not yet: OnePrompt (its VOR phase needs an experience's end).
"""

from __future__ import annotations

import heapq
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.common import MessageType
from prefect import flow

from lifelong import tracking
from lifelong.bridges.flower import protocol
from lifelong.bridges.flower.dp_fedavg import private_keys
from lifelong.bridges.flower.records import from_state_dict, to_state_dict
from lifelong.checkpoints import (
    ResumeError,
    checkpoint_dir,
    config_fingerprint,
    read_checkpoint,
    write_checkpoint,
)
from lifelong.clients.inprocess import InProcessGrid
from lifelong.clients.learner import frozen_keys
from lifelong.config import Config, strategy_label
from lifelong.flows import privacy_ledger
from lifelong.flows.federated import (
    FederatedResult,
    initial_weights,
    log_split,
    open_federated_run,
    split_report,
)
from lifelong.privacy.clipping import clip_update, private_mean
from lifelong.privacy.ledger import PrivacyLedger
from lifelong.strategies.federated.staleness import fedasync_mix, fedbuff_scale, fedbuff_step
from lifelong.tasks import client_eval
from lifelong.tasks.evaluation import correct_predictions
from lifelong.tasks.fleet import Fleet, build_fleet
from lifelong.tasks.metrics import matrix_summary
from lifelong.tasks.models import build_stream_model
from lifelong.tasks.streams import build_stream

CLOCK_VERSION = 1
#: The loop's attributes a checkpoint holds as they are (the rest: generators, ledger, clients).
_LOOP_STATE = ("events", "seq", "busy", "buffer", "buffered", "log", "window", "total", "participations",
               "drops", "starts", "rows", "hourly", "state", "version", "personal")
EVENTS_FILE = "clock_events.json"
CLIENTS_FILE = "clock_clients.json"
FIGURE_FILE = "clock.png"

# event kinds, in the order they are handled at the same instant (a finish before the
# evaluation that follows it; a wake after both)
FINISH, DROP, ROUND_END, EVAL, ROUND, WAKE = range(6)
NAMES = {FINISH: "finish", DROP: "drop", ROUND_END: "round_end", EVAL: "eval", ROUND: "round", WAKE: "wake"}


class ClockError(RuntimeError):
    """A run the clock cannot make progress in (no client is ever online with data)."""


@dataclass
class Started:
    client: int
    start: float
    version: int
    base: dict[str, torch.Tensor]  # the global model it started from
    content: RecordDict | None = None  # its reply (None: dropped)
    finish: float = 0.0
    experience: int = -1


@dataclass
class Counters:
    applied: int = 0
    dropped: int = 0
    late: int = 0
    staleness: list[int] = field(default_factory=list)


def clock_checkpoint_file(run_id: str) -> Path:
    return checkpoint_dir(run_id) / "clock.pt"


class VirtualClock:
    def __init__(self, cfg: Config, run_id: str, uri: str, client_app=None, log=sys.stderr,
                 checkpoint: Path | None = None):
        """``checkpoint``: where to save the loop, every ``clock.checkpoint_every_hours`` (None: nowhere)."""
        from lifelong.clients.app import app as default_app

        self.cfg, self.clock, self.run_id, self.uri, self.out = cfg, cfg.clock, run_id, uri, log
        self.checkpoint = checkpoint
        self.client_chunks = 0  # files of clients' states written beside the checkpoint
        self.next_checkpoint = cfg.clock.checkpoint_every_hours  # the virtual hour of the next one
        self.client = tracking.client_for(uri)
        self.logger = tracking.MLflowLogger(run_id, self.client)
        self.stream = build_stream(cfg.stream, cfg.seed)
        self.n, self.n_exp = cfg.federated.clients, self.stream.n_experiences
        self.fleet: Fleet = build_fleet(self.clock, self.n, self.n_exp, cfg.seed)
        self.rng = np.random.default_rng([cfg.seed, 0xC10C])  # who is started, who drops out
        self.model = build_stream_model(cfg.model, self.stream)
        self.state = initial_weights(cfg)
        self.version = 0
        self._encoded: tuple[int, object] | None = None  # (version, ArrayRecord): one encoding a version
        self.grid = InProcessGrid(client_app or default_app, self.n)
        self.node_of = {pid: node for node, pid in self.grid.partitions.items()}
        self.config_json = json.dumps(cfg.model_dump(mode="json"))
        self.events: list[tuple[float, int, int, int, object]] = []
        self.seq = 0
        self.busy: dict[int, Started] = {}
        self.buffer: list[tuple[dict[str, torch.Tensor], int]] = []
        self.buffered: list[int] = []  # whose deltas are in the buffer
        self.log: list[list] = []
        self.window, self.total = Counters(), Counters()
        self.participations = np.zeros(self.n, dtype=int)
        self.drops = np.zeros(self.n, dtype=int)
        self.starts = 0
        self.rows: list[list[float]] = []
        self.hourly: list[dict[str, float]] = []
        self.test_shares = client_eval.TestShares(cfg, self.stream)
        #: Each client's latest report of its personalised model's accuracy on its own test share
        #: of each experience it had seen (learners with local state, without DP).
        self.personal: dict[int, list[float]] = {}
        #: User-level DP: each applied update clipped, the noise added once per server step, and
        #: every client charged in the ledger for the updates of its that were applied.
        p = cfg.privacy
        self.dp = p.clipping != "off"
        self.ledger = privacy_ledger.build_ledger(cfg) if self.dp else None
        self.private = private_keys(self.state, frozen_keys(cfg, self.stream)) if self.dp else []
        self.noise = torch.Generator().manual_seed(cfg.seed)

    # -- the event queue ----------------------------------------------------------------------
    def push(self, t: float, kind: int, payload: object = None) -> None:
        self.seq += 1
        heapq.heappush(self.events, (t, kind, self.seq, payload))

    def record(self, t: float, kind: str, client: int | None = None, **detail) -> None:
        self.log.append([round(t, 6), kind, client, detail])

    def run(self, resume: dict | None = None) -> FederatedResult:
        """Process the events in virtual-time order to the horizon; ``resume``: a checkpoint of
        this run (``save``) to go on from."""
        horizon, t0 = self.clock.hours, time.perf_counter()
        if resume is not None:
            self.restore(resume)
            print(f"[clock] resumed at hour {resume['hour']:g} (server version {self.version})",
                  file=self.out, flush=True)
            return self.loop(t0)
        first = [self.fleet.next_ready(c, 0.0) for c in range(self.n)]
        if all(f is None or f >= horizon for f in first):
            raise ClockError(f"no client is ever online with data within clock.hours = {horizon:g}: check "
                             "clock.availability (or the trace), clock.experience_hours and arrival_spread_hours")
        every = self.clock.eval_every_hours
        for k in range(1, math.floor(horizon / every + 1e-9) + 1):
            self.push(k * every, EVAL, ("hour", k * every))
        row_times = [min((k + 1) * self.clock.experience_hours, horizon) for k in range(self.n_exp - 1)] + [horizon]
        for k, rt in enumerate(row_times):
            self.push(rt, EVAL, ("row", k))
        if self.clock.mode == "deadline":
            self.push(0.0, ROUND)
        else:
            self.push(0.0, WAKE)
        print(f"[clock] {self.clock.mode}: {self.n} clients over {horizon:g} virtual hours, online "
              f"{self.fleet.online_fraction(horizon):.0%} of the time on average", file=self.out, flush=True)
        return self.loop(t0)

    def loop(self, t0: float) -> FederatedResult:
        horizon = self.clock.hours
        while self.events:
            t, kind, _, payload = heapq.heappop(self.events)
            if t > horizon:
                break
            if kind == EVAL:
                self.evaluate(t, *payload)
            elif kind == WAKE:
                self.fill(t)
            elif kind == ROUND:
                self.start_round(t)
            elif kind == ROUND_END:
                self.end_round(t, payload)
            elif kind == FINISH:
                self.arrive(t, payload)
            elif kind == DROP:
                self.dropped(t, *payload)
        return self.finish(time.perf_counter() - t0)

    # -- checkpoints ------------------------------------------------------------------------------
    def save(self, t: float) -> None:
        """The loop's state at ``t`` (an evaluation just made), with the values logged but not yet
        sent to MLflow (sent at the end, in one batch; a resumed run sends them then)."""
        # The clients' states incrementally: each checkpoint adds a file with the states of the
        # clients that trained since the previous one (all 1,000 clients' replay memories every
        # hour made checkpoints a third of the clock benchmark's time). Written before the main
        # file, which counts them: a kill in between leaves the previous checkpoint whole.
        write_checkpoint({"clients": self.grid.take_changed()}, self._chunk(self.client_chunks))
        self.client_chunks += 1
        state = {"version": CLOCK_VERSION, "config": config_fingerprint(self.cfg), "run_id": self.run_id,
                 "hour": t, "loop": {name: getattr(self, name) for name in _LOOP_STATE},
                 "rng": self.rng.bit_generator.state, "noise": self.noise.get_state(),
                 "ledger": self.ledger.to_json() if self.ledger is not None else None,
                 "pending": self.logger.pending(), "client_chunks": self.client_chunks,
                 "next_checkpoint": self.next_checkpoint}
        write_checkpoint(state, self.checkpoint)

    def _chunk(self, k: int) -> Path:
        return self.checkpoint.with_name(f"{self.checkpoint.stem}-clients-{k}.pt")

    def restore(self, saved: dict) -> None:
        for name in _LOOP_STATE:
            setattr(self, name, saved["loop"][name])
        self.rng.bit_generator.state = saved["rng"]
        self.noise.set_state(saved["noise"])
        if self.ledger is not None:
            self.ledger.restore(PrivacyLedger.from_json(saved["ledger"]))
        states: dict = {}
        for k in range(saved["client_chunks"]):  # in order: a later file holds a client's newer state
            path = self._chunk(k)
            try:
                states.update(torch.load(path, weights_only=False)["clients"])
            except (OSError, EOFError, KeyError, RuntimeError) as exc:
                raise ResumeError(f"checkpoint {self.checkpoint}: its clients' states in {path} are missing or "
                                  f"unreadable ({type(exc).__name__}: {exc})") from None
        self.grid.restore_states(states)
        self.client_chunks = saved["client_chunks"]
        self.next_checkpoint = saved["next_checkpoint"]
        self.logger.restore(saved["pending"])

    # -- a client's round -----------------------------------------------------------------------
    def begin(self, client: int, t: float) -> Started:
        """Start ``client``'s local round at ``t``: trains it now (unless it will drop out) and
        returns when its update arrives."""
        s = Started(client, t, self.version, self.state)
        duration = self.fleet.duration(client)
        offline = self.fleet.online_until(client, t)
        if self.rng.random() < self.clock.dropout:
            s.finish = t + self.rng.random() * duration
            self.record(t, "start", client, version=self.version, outcome="drops out")
            return s
        if t + duration > offline >= self.clock.hours:  # it would finish after the simulation ends
            s.finish = math.inf
            self.record(t, "start", client, version=self.version, outcome="unfinished at the end")
            return s
        if t + duration > offline:
            s.finish = offline
            self.record(t, "start", client, version=self.version, outcome="goes offline")
            return s
        s.finish = t + duration
        self.starts += 1
        experience = s.experience = self.fleet.experience_at(client, t)
        if self._encoded is None or self._encoded[0] != self.version:
            self._encoded = (self.version, from_state_dict(self.state))
        config = ConfigRecord({protocol.SERVER_ROUND: self.starts, protocol.ROUND_OFFSET: 0,
                               protocol.EXPERIENCE: experience, protocol.RUN_CONFIG: self.config_json,
                               protocol.REPORT_PERSONAL: 1})
        msg = self.grid.create_message(RecordDict({protocol.ARRAYS: self._encoded[1], protocol.CONFIG: config}),
                                       MessageType.TRAIN, self.node_of[client], group_id="clock")
        reply: Message = next(iter(self.grid.send_and_receive([msg])))
        if reply.has_error():
            self.record(t, "start", client, version=self.version, outcome=f"failed: {reply.error.reason}")
            return s
        s.content = reply.content
        self.record(t, "start", client, version=self.version, experience=experience)
        return s

    def dropped(self, t: float, client: int, why: str) -> None:
        self.busy.pop(client, None)
        self.drops[client] += 1
        self.window.dropped += 1
        self.total.dropped += 1
        self.record(t, "drop", client, why=why)
        self.fill(t)

    # -- asynchronous modes ---------------------------------------------------------------------
    def fill(self, t: float) -> None:
        """Keep ``concurrency`` clients training: start idle clients that are online with data;
        if there are none, wake up when the first one will be."""
        if self.clock.mode == "deadline":
            return
        if len(self.busy) >= self.clock.concurrency:
            return
        # One pass over the fleet per call, not per start: at 1,000 clients that pass is the cost.
        # Under DP a client whose update waits in FedBuff's buffer is not started again before the
        # step: two of its updates in one noised sum would double its sensitivity (2C under zC).
        held = {c for c in self.buffered} if self.dp else set()
        ready = [int(c) for c in self.fleet.ready_clients(t)
                 if c not in self.busy and c not in held and not self.spent(c, t)]
        while len(self.busy) < self.clock.concurrency:
            if not ready:
                nxt = [x for c in range(self.n) if c not in self.busy and c not in held and not self.spent(c, t)
                       and (x := self.fleet.next_ready(c, t)) is not None and x > t]
                if nxt:
                    self.push(min(nxt), WAKE)
                return
            client = ready.pop(int(self.rng.integers(len(ready))))
            s = self.begin(client, t)
            self.busy[client] = s
            if s.content is None:
                self.push(s.finish, DROP, (client, "dropped out or went offline mid-round"))
            else:
                self.push(s.finish, FINISH, s)

    def arrive(self, t: float, s: Started) -> None:
        """An asynchronous update arrives: mixed in (FedAsync) or buffered (FedBuff)."""
        self.busy.pop(s.client, None)
        self._personal(s)
        staleness = self.version - s.version
        new = to_state_dict(s.content[protocol.ARRAYS])
        c = self.clock
        self.participations[s.client] += 1
        if self.dp:  # charged on arrival (an update still in FedBuff's buffer at the end counts too)
            self.ledger.record(s.client, self.run_id, s.experience, self.version + 1, self.cfg.privacy.noise_multiplier)
        if c.mode == "fedasync":
            if self.dp:  # the client's model as its own clipped, noised delta makes it
                delta = self.noised_mean([self.clipped(new, s.base)], 1)
                new = {k: (s.base[k].float() + delta[k]).to(v.dtype) if k in delta else self.state[k]
                       for k, v in self.state.items()}
            self.state = fedasync_mix(self.state, new, c.mixing, staleness, c.staleness, c.staleness_a, c.staleness_b)
            self.version += 1
            self._applied(staleness)
            self.record(t, "apply", s.client, staleness=staleness, version=self.version)
        else:
            delta = {k: (new[k].float() - s.base[k].float()) for k, v in s.base.items() if v.is_floating_point()}
            self.buffer.append((delta, staleness))
            self.buffered.append(s.client)
            self.record(t, "buffer", s.client, staleness=staleness, buffered=len(self.buffer))
            if len(self.buffer) == c.buffer and self.dp:  # scaled after clipping: each still within C
                mean = self.noised_mean([[fedbuff_scale(st) * x for x in self.clipped_delta(d)]
                                          for d, st in self.buffer], c.buffer)
                self.state = {k: (v.float() + c.server_lr * mean[k]).to(v.dtype) if k in mean else v
                              for k, v in self.state.items()}
            elif len(self.buffer) == c.buffer:
                self.state = fedbuff_step(self.state, [d for d, _ in self.buffer], [st for _, st in self.buffer],
                                          c.server_lr)
            if len(self.buffer) == c.buffer:
                self.version += 1
                for _, st in self.buffer:
                    self._applied(st)
                self.buffer, self.buffered = [], []
                self.record(t, "step", None, version=self.version)
        self.fill(t)

    def _personal(self, s: Started) -> None:
        """Keep the client's report of its personalised model, when its round finished."""
        m = s.content[protocol.METRICS]
        if protocol.PERSONAL_ACC in m:
            self.personal[s.client] = [float(a) for a in m[protocol.PERSONAL_ACC]]

    def _applied(self, staleness: int) -> None:
        for counter in (self.window, self.total):
            counter.applied += 1
            counter.staleness.append(staleness)

    # -- synchronous rounds with a deadline ------------------------------------------------------
    def start_round(self, t: float) -> None:
        c = self.clock
        ready = [int(x) for x in self.fleet.ready_clients(t) if not self.spent(x, t)]
        if len(ready) < c.cohort:  # as a deployed server does, wait until a cohort's worth has checked in
            waiting = [i for i in range(self.n) if i not in ready and not self.spent(i, t)]
            nxt = [x for i in waiting if (x := self.fleet.next_ready(i, t)) is not None and x > t]
            if nxt:
                self.push(min(nxt), ROUND)
            return
        k = min(len(ready), math.ceil(c.cohort * (1 + c.over_selection)))
        chosen = sorted(int(x) for x in self.rng.choice(ready, size=k, replace=False))
        self.record(t, "round", None, version=self.version, started=chosen)
        started = [self.begin(x, t) for x in chosen]
        deadline = t + c.deadline_minutes / 60
        arrived = sorted((s for s in started if s.content is not None and s.finish <= deadline),
                         key=lambda s: (s.finish, s.client))
        accepted = arrived[: c.cohort]
        end = accepted[-1].finish if len(accepted) == c.cohort else deadline
        self.push(end, ROUND_END, (started, accepted))

    def end_round(self, t: float, payload) -> None:
        started, accepted = payload
        kept = {s.client for s in accepted}
        for s in started:  # a late client trained its own model all the same
            if s.content is not None and s.finish <= t:
                self._personal(s)
        for s in started:
            if s.client in kept:
                continue
            late = s.content is not None
            self.drops[s.client] += 1
            self.window.dropped += 1
            self.total.dropped += 1
            self.window.late += late
            self.total.late += late
            self.record(min(s.finish, t), "drop", s.client,
                        why="late: after the cohort was complete or the deadline" if late
                        else "dropped out or went offline mid-round")
        if accepted and self.dp:  # clients weigh equally; the sum over the cohort, noised once (DP-FedAvg)
            base = accepted[0].base
            mean = self.noised_mean([self.clipped(to_state_dict(s.content[protocol.ARRAYS]), base) for s in accepted],
                                     self.clock.cohort)
            self.state = {k: (v.float() + mean[k]).to(v.dtype) if k in mean else v for k, v in base.items()}
            for s in accepted:  # (the late and the dropped spend nothing: their data never reached the model)
                self.ledger.record(s.client, self.run_id, s.experience, self.version + 1,
                                   self.cfg.privacy.noise_multiplier)
            self.version += 1
        elif accepted:
            replies = [(to_state_dict(s.content[protocol.ARRAYS]), int(s.content[protocol.METRICS][protocol.NUM_EXAMPLES]))
                       for s in accepted]
            total = sum(n for _, n in replies)
            self.state = {k: (sum(w[k].double() * n for w, n in replies) / total).to(v.dtype) if v.is_floating_point()
                          else v for k, v in self.state.items()}
            self.version += 1
        for s in accepted:
            self.participations[s.client] += 1
            self._applied(0)
        self.record(t, "round_end", None, version=self.version, applied=sorted(kept))
        self.push(t, ROUND)

    # -- user-level DP ------------------------------------------------------------------------------
    def spent(self, client: int, t: float) -> bool:
        """Whether ``client`` cannot afford one more update (recorded, and logged once)."""
        if self.ledger is None:
            return False
        z = self.cfg.privacy.noise_multiplier
        if self.ledger.can_take_part(client, z):
            return False
        if all(c != client for _, c, _ in self.ledger.stops):
            self.ledger.stop(self.version, client, z)
            self.record(t, "budget", client, why=self.ledger.stops[-1][2])
        return True

    def clipped(self, new: dict[str, torch.Tensor], base: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        return self.clipped_delta({k: new[k].float() - base[k].float() for k in self.private})

    def clipped_delta(self, delta: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        p = self.cfg.privacy
        return clip_update([delta[k] for k in self.private], p.clip, p.clipping,
                           allocation=p.allocation if p.clipping in ("per_layer", "per_layer_normalize") else None).update

    def noised_mean(self, clipped: list[list[torch.Tensor]], denominator: int) -> dict[str, torch.Tensor]:
        p = self.cfg.privacy
        return dict(zip(self.private, private_mean(clipped, p.noise_multiplier, p.clip, denominator, self.noise)))

    # -- evaluation -------------------------------------------------------------------------------
    def evaluate(self, t: float, what: str, index: float) -> None:
        self.model.load_state_dict(self.state)
        reached = [self.fleet.experience_at(c, t) for c in range(self.n)]
        upto = max(reached)
        if what == "row":  # a matrix row evaluates every experience seen so far, as in synchronous runs
            upto = max(upto, int(index))
        correct = {e: correct_predictions(self.model, *self.stream.test_tensors(e), self.cfg.training.eval_batch_size,
                                          "cpu") for e in range(upto + 1)}
        accs = {e: int(c.sum()) / max(1, len(c)) for e, c in correct.items()}
        if what == "row":
            self.rows.append([accs.get(e, float("nan")) for e in range(self.n_exp)])
            self.logger.log_values({f"matrix/acc_exp{e}": a for e, a in enumerate(self.rows[-1])}, int(index))
            return
        per_exp = np.full((self.n, self.n_exp), np.nan)
        for e, flags in correct.items():
            per_exp[:, e] = client_eval.client_accuracies(flags, self.test_shares[e])
        own = client_eval.reached_accuracy(per_exp, np.array(reached))
        values = {f"clock/acc_exp{e}": a for e, a in accs.items()}
        values["clock/avg_acc_reached"] = float(np.mean(list(accs.values()))) if accs else float("nan")
        if np.isfinite(own).any():
            values.update({f"clock/clients_acc_{k}": v for k, v in client_eval.spread(own[np.isfinite(own)]).items()})
        values.update(self._personal_values(own))
        w = self.window
        values.update({"clock/updates_applied": w.applied, "clock/updates_dropped": w.dropped,
                       "clock/updates_late": w.late, "clock/server_version": self.version,
                       "clock/clients_participated": int((self.participations > 0).sum()),
                       "clock/clients_online": sum(self.fleet.online(c, t) for c in range(self.n))})
        if self.ledger is not None:
            values.update(privacy_ledger.round_values(self.ledger, self.n))
        if w.staleness:
            values.update({"clock/staleness_mean": float(np.mean(w.staleness)),
                           "clock/staleness_max": float(max(w.staleness))})
        step = round(index / self.clock.eval_every_hours)
        self.logger.log_values(values, step)
        self.hourly.append({"hour": index, **values})
        self.window = Counters()
        if self.checkpoint is not None and t >= self.next_checkpoint - 1e-9:
            while self.next_checkpoint <= t + 1e-9:
                self.next_checkpoint += self.clock.checkpoint_every_hours
            self.save(t)
        print(f"[clock] hour {index:g}: version {self.version}, accuracy on reached experiences "
              f"{values['clock/avg_acc_reached']:.3f}, {w.applied} updates applied, {w.dropped} dropped",
              file=self.out, flush=True)

    def _personal_values(self, own: np.ndarray) -> dict[str, float]:
        """The spread of the clients' latest personalised accuracy (each over the experiences it had
        seen when it reported), and its mean gain over the global model's on the same clients."""
        clients = sorted(self.personal)
        summary = client_eval.personal_summary([self.personal[c] for c in clients], own[clients])
        return {f"clock/{k}": v for k, v in summary.items()}

    # -- the end ------------------------------------------------------------------------------------
    def finish(self, wall_s: float) -> FederatedResult:
        matrix = np.array(self.rows)
        summary = matrix_summary(matrix)
        last = self.hourly[-1] if self.hourly else {}
        summary.update({k.replace("clock/", ""): v for k, v in last.items() if k.startswith("clock/clients_acc_")})
        self.logger.log_values({f"final/{k}": v for k, v in summary.items()}, self.n_exp - 1)
        self.logger.log_values({"cost/updates": self.total.applied, "cost/server_versions": self.version,
                                "cost/updates_dropped": self.total.dropped, "cost/local_rounds_trained": self.starts,
                                "cost/wall_s": wall_s}, self.n_exp - 1)
        self.logger.flush()
        labels = [f"exp{i}" for i in range(self.n_exp)]
        tracking.log_matrix(self.client, self.run_id, matrix, labels)
        self.client.log_dict(self.run_id, {"columns": ["hour", "event", "client", "detail"], "data": self.log},
                             EVENTS_FILE)
        self.client.log_dict(self.run_id, {
            "columns": ["client", "speed", "online_fraction", "participations", "dropped"],
            "data": [[c, float(self.fleet.speeds[c]), sum(e - s for s, e in self.fleet.windows[c]) / self.clock.hours,
                      int(self.participations[c]), int(self.drops[c])] for c in range(self.n)]}, CLIENTS_FILE)
        if self.ledger is not None:
            privacy_ledger.log_ledger(self.client, self.run_id, self.ledger, self.n, self.cfg.tracking.log_plots)
        if self.cfg.tracking.log_plots and self.hourly:
            tracking.log_figure(self.client, self.run_id, clock_figure(self.hourly, self.total, self.label),
                                FIGURE_FILE)
        cost = (f"{self.clock.hours:g} virtual hours in {wall_s:.1f} s: {self.total.applied} updates applied "
                f"({self.version} server versions), {self.total.dropped} dropped"
                + (f" ({self.total.late} late)" if self.total.late else "") + "; clients' accuracy on their own "
                f"reached experiences: mean {summary.get('clients_acc_mean', float('nan')):.3f}, worst "
                f"{summary.get('clients_acc_worst', float('nan')):.3f}")
        return FederatedResult(self.run_id, self.uri, self.label, matrix, summary, self.version,
                               failures=int(self.total.dropped), timings={"rounds_s": wall_s},
                               weights={k: v.clone() for k, v in self.state.items()}, cost_line=cost)

    @property
    def label(self) -> str:
        return f"{self.clock.mode} {strategy_label(self.cfg.strategies[0])}"


def clock_figure(hourly: list[dict[str, float]], total: Counters, label: str):
    """Accuracy and the clients' spread over virtual hours; updates applied and dropped per
    interval; the staleness of the applied updates."""
    plt = tracking.pyplot()

    hours = [h["hour"] for h in hourly]
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    ax = axes[0]
    ax.plot(hours, [h["clock/avg_acc_reached"] for h in hourly], label="global, pooled", lw=2)
    if "clock/clients_acc_mean" in hourly[-1]:
        get = [h.get for h in hourly]
        ax.plot(hours, [g("clock/clients_acc_mean", np.nan) for g in get], label="clients, mean")
        ax.fill_between(hours, [g("clock/clients_acc_p10", np.nan) for g in get],
                        [g("clock/clients_acc_p90", np.nan) for g in get], alpha=0.25, label="clients, p10–p90")
        ax.plot(hours, [g("clock/clients_acc_worst", np.nan) for g in get], ls=":", label="worst client")
    ax.set_xlabel("virtual hour")
    ax.set_ylabel("accuracy on reached experiences")
    ax.set_title(label)
    ax.legend(fontsize=8)
    ax = axes[1]
    ax.bar(hours, [h["clock/updates_applied"] for h in hourly], width=0.8 * (hours[0] if hours else 1),
           label="applied")
    ax.bar(hours, [-h["clock/updates_dropped"] for h in hourly], width=0.8 * (hours[0] if hours else 1),
           label="dropped")
    ax.set_xlabel("virtual hour")
    ax.set_title("updates per interval")
    ax.legend(fontsize=8)
    ax = axes[2]
    if total.staleness:
        ax.hist(total.staleness, bins=range(max(total.staleness) + 2))
    ax.set_xlabel("staleness (server versions)")
    ax.set_title("applied updates' staleness")
    fig.tight_layout()
    return fig


def load_clock_checkpoint(run_id: str, cfg: Config) -> dict:
    path = clock_checkpoint_file(run_id)
    if not path.exists():
        raise ResumeError(f"no checkpoint at {path}: the run stopped before its first evaluation "
                          f"(clock.eval_every_hours = {cfg.clock.eval_every_hours:g}); run it again")
    return read_checkpoint(path, cfg, CLOCK_VERSION, "Lifelong virtual-clock")


@flow(name="federated-clock", validate_parameters=False)
def clock_flow(cfg: Config, client_app=None, log=None, resume: str | None = None) -> FederatedResult:
    """A federated run on the virtual clock: opens the MLflow run (or goes on in ``resume``'s,
    from its checkpoint), runs the event loop. ``log``: where progress lines go (default stderr;
    not a default value itself: Prefect would try to put the stream in the flow's JSON schema)."""
    from lifelong.env import default_tracking_uri

    log = log or sys.stderr

    uri = cfg.tracking.uri or default_tracking_uri()
    client = tracking.client_for(uri)
    saved = None
    if resume is None:
        hists = split_report(cfg)
        run_id = open_federated_run(cfg, uri, tags={"lifelong.clock": cfg.clock.mode})
        log_split(cfg, run_id, uri, hists)
    else:
        run_id, saved = resume, load_clock_checkpoint(resume, cfg)
        client.update_run(run_id, status="RUNNING")
    print(f"[lifelong] MLflow run {run_id}; if interrupted: lifelong clients launch --resume {run_id}",
          file=log, flush=True)
    with tracking.terminated(client, run_id):
        return VirtualClock(cfg, run_id, uri, client_app, log, clock_checkpoint_file(run_id)).run(saved)
