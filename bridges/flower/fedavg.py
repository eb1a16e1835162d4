"""FedAvg for continual rounds: Flower's own ``FedAvg`` (McMahan et al., AISTATS 2017), extended
only where a reproducible, fault-tolerant continual run needs it.

* Client sampling is seeded per round (Flower samples with the global ``random`` module), so the
  same config and seed sample the same clients.
* A round aggregates only when at least ``min_results`` sampled clients replied; otherwise the
  global model is kept and the round is reported as skipped.
* Every sampled client's outcome (ok / failed with the reason / lost) is recorded per round,
  with its partition id once the client has reported it, for the per-client table.
* Replies are aggregated in partition order, whatever order they arrived in.
* Aggregated metrics average only the training loss (FedAvg would also average ids).
* The weighted mean is Flower's, value for value, read and written through our codec for
  Flower's array format (``bridges/flower/records.py``), which costs a fraction of ``np.load``/``np.save``.
* A tensor every client returned exactly as it was sent (a frozen backbone) stays bit for bit,
  and a non-float one (the ViT's bool class mask, a counter) keeps its dtype (:meth:`mend_mean`).
* The new global model is the server optimizer's step from the aggregate
  (``strategies/federated/server_optimizers.py``; plain FedAvg by default). :meth:`server_step` is the one
  place it is applied: here after FedAvg's mean, and by the DP wrapper after its private mean.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from lifelong.bridges.flower import protocol
from lifelong.bridges.flower.records import (
    from_numpy,
    from_state_dict,
    to_numpy,
    to_state_dict,
    weighted_mean,
)
from lifelong.strategies.federated.server_optimizers import ServerOptimizer

log = logging.getLogger("lifelong.federated")


@dataclass
class ClientOutcome:
    round: int
    node_id: int
    partition_id: int | None
    status: str  # ok | failed | lost
    num_examples: int = 0
    train_loss: float = float("nan")
    reason: str = ""
    #: The client's sample-level epsilon so far (``[privacy.sample]``; reply metric ``sample-epsilon``).
    sample_epsilon: float | None = None
    #: Its personalised model's accuracy on its own test share of each experience seen, at an
    #: experience's last round (reply metric ``personal-acc``; learners with local state, no DP).
    personal: list[float] | None = None
    #: The round of the saved state the client went on from, when its node had none (it came
    #: back after dying, or the run was resumed; reply metric ``restored-from-round``).
    restored_from: int | None = None


def _mean_loss(records: list[RecordDict], weighted_by_key: str) -> MetricRecord:
    total = sum(float(r[protocol.METRICS][weighted_by_key]) for r in records)
    loss = sum(float(r[protocol.METRICS][protocol.TRAIN_LOSS]) * float(r[protocol.METRICS][weighted_by_key])
               for r in records)
    return MetricRecord({protocol.TRAIN_LOSS: loss / total if total else float("nan")})


class ContinualFedAvg(FedAvg):
    def __init__(self, fraction: float, min_results: int, num_clients: int, seed: int,
                 wait_for_nodes_s: float = 300.0, server_optimizer: ServerOptimizer | None = None):
        super().__init__(fraction_train=fraction, fraction_evaluate=1.0, min_train_nodes=1,
                         min_evaluate_nodes=0, min_available_nodes=num_clients,
                         train_metrics_aggr_fn=_mean_loss)
        self.min_results, self.seed, self.wait_for_nodes_s = min_results, seed, wait_for_nodes_s
        self.round_offset = 0  # global round = offset + Flower's per-start round
        #: Sent with every train message when set (the model the previous experience ended with).
        self.boundary: ArrayRecord | None = None
        self._all_connected = False
        self.outcomes: list[ClientOutcome] = []
        self.skipped_rounds: list[int] = []
        self._sent: list[int] = []
        self._messages: list[Message] = []
        self._partition_of: dict[int, int] = {}
        self.server_optimizer = server_optimizer or ServerOptimizer("fedavg")
        self._global: ArrayRecord | None = None  # the model this round was sent with
        #: Partitions not to sample (set each round by a wrapper: the DP ledger's clients at budget).
        self.excluded_partitions: set[int] = set()

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        # Wait for every client before the first round only: later, a client that has gone
        # (a SuperNode stopped) must not stop the run; the round samples from those online.
        nodes = sorted(grid.get_node_ids() if self._all_connected else self._wait_for_nodes(grid))
        self._all_connected = True
        self._global = arrays
        size = min(max(int(self.min_available_nodes * self.fraction_train), self.min_train_nodes), len(nodes))
        if self.excluded_partitions:  # each remaining client keeps its sampling rate, not the cohort's size
            nodes = [n for n in nodes if self._partition_of.get(n) not in self.excluded_partitions]
            size = min(max(round(len(nodes) * self.fraction_train), self.min_train_nodes if nodes else 0), len(nodes))
        rng = random.Random(f"{self.seed}/{self.round_offset + server_round}")
        self._sent = rng.sample(nodes, size)
        config[protocol.SERVER_ROUND] = server_round
        record = RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: config})
        if self.boundary is not None:
            record[protocol.BOUNDARY] = self.boundary
        # Kept to know whom a reply answers: the grid gives each message its id when it pushes it.
        self._messages = list(self._construct_messages(record, self._sent, MessageType.TRAIN))
        return self._messages

    def configure_evaluate(self, server_round, arrays, config, grid) -> Iterable[Message]:
        return []  # the server evaluates the global model itself, on every experience

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        valid = self.record_replies(server_round, replies)
        if valid is None:
            return None, None
        # Flower's weighted mean, value for value (``aggregate_arrayrecords``), through our codec
        # (``bridges/flower/records.py``): the replies were checked and logged by record_replies.
        contents = [msg.content for msg in valid]
        aggregated = weighted_mean([c[self.arrayrecord_key] for c in contents],
                                   [c[protocol.METRICS][self.weighted_by_key] for c in contents])
        metrics = self.train_metrics_aggr_fn(contents, self.weighted_by_key)
        return self.server_step(self.mend_mean(aggregated, valid)), metrics

    def mend_mean(self, aggregated: ArrayRecord, replies: list[Message]) -> ArrayRecord:
        """Flower's weighted mean, mended for two kinds of tensors.

        A tensor no client changed is the one sent, bit for bit: the float sum of ``w_i * x`` is
        ``x`` only up to rounding, and LAMB or LARS (``strategies/federated/server_optimizers.py``) would turn
        that last-bit difference into a step of a full trust ratio on a frozen backbone. A
        non-float tensor, which Flower averages into float64, gets its dtype back as the rounded
        weighted mean (for a bool mask: the weighted majority).
        """
        out = {}
        for key, sent in self._global.items():
            returned = [msg.content[self.arrayrecord_key][key] for msg in replies]
            if all(a.dtype == sent.dtype and a.shape == sent.shape and a.data == sent.data for a in returned):
                out[key] = sent
            elif not np.issubdtype(np.dtype(sent.dtype), np.floating):
                out[key] = from_numpy(np.asarray(np.round(to_numpy(aggregated[key])), dtype=sent.dtype))
            else:
                out[key] = aggregated[key]
        return ArrayRecord(out)

    def server_step(self, aggregated: ArrayRecord) -> ArrayRecord:
        """The new global model: the server optimizer's step from the round's model to ``aggregated``."""
        if self.server_optimizer.is_identity:
            return aggregated  # plain FedAvg: the mean itself, bit for bit
        new = self.server_optimizer.step(dict(to_state_dict(self._global)), dict(to_state_dict(aggregated)))
        return from_state_dict(new)

    def server_state(self) -> dict:
        """The server's state beyond the records (for checkpoints): the optimizer's moments."""
        return {"optimizer": self.server_optimizer.state_dict()}

    def load_server_state(self, state: dict) -> None:
        self.server_optimizer.load_state_dict(state["optimizer"])

    def record_replies(self, server_round: int, replies: Iterable[Message]) -> list[Message] | None:
        """Record every sampled client's outcome; the valid replies in partition order, or None
        when fewer than ``min_results`` (the round is then skipped)."""
        replies = list(replies)
        rnd = self.round_offset + server_round
        valid, errors = self._check_and_log_replies(replies, is_train=True)
        # The node a reply answers for: the one its message went to. An error the SuperLink sends
        # on behalf of a node (e.g. "Node Unavailable", once a dead node's heartbeat expired) comes
        # from the SuperLink's own node id, not from the node that never answered.
        sent_to = {m.metadata.message_id: m.metadata.dst_node_id for m in self._messages if m.metadata.message_id}

        def node_of(msg: Message) -> int:
            return sent_to.get(msg.metadata.reply_to_message_id, msg.metadata.src_node_id)

        for msg in valid:
            m = msg.content[protocol.METRICS]
            node = node_of(msg)
            restored = int(m.get(protocol.RESTORED_ROUND, -1))  # -1: the client had its state
            self._partition_of[node] = int(m[protocol.PARTITION_ID])
            self.outcomes.append(ClientOutcome(rnd, node, int(m[protocol.PARTITION_ID]), "ok",
                                               int(m[self.weighted_by_key]), float(m[protocol.TRAIN_LOSS]),
                                               sample_epsilon=float(m[protocol.SAMPLE_EPSILON])
                                               if protocol.SAMPLE_EPSILON in m else None,
                                               personal=[float(a) for a in m[protocol.PERSONAL_ACC]]
                                               if protocol.PERSONAL_ACC in m else None,
                                               restored_from=restored if restored >= 0 else None))
            if restored >= 0:
                log.info("round %d: client %d (partition %d) had no state on its node and went on from "
                         "the state it saved after round %d", rnd, node, int(m[protocol.PARTITION_ID]), restored)
        for msg in errors:
            node = node_of(msg)
            log.warning("round %d: client %d (partition %s) failed: %s", rnd, node,
                        self._partition_of.get(node, "?"), msg.error.reason)
            self.outcomes.append(ClientOutcome(rnd, node, self._partition_of.get(node), "failed",
                                               reason=msg.error.reason))
        replied = {node_of(m) for m in replies}
        for node in self._sent:
            if node not in replied:
                log.warning("round %d: client %d (partition %s) sent no reply before the round's timeout",
                            rnd, node, self._partition_of.get(node, "?"))
                self.outcomes.append(ClientOutcome(rnd, node, self._partition_of.get(node), "lost",
                                                   reason="no reply before round_timeout"))
        if len(valid) < self.min_results:
            log.warning("round %d: %d of %d sampled clients replied, fewer than min_results=%d: "
                        "the global model is kept", rnd, len(valid), len(self._sent), self.min_results)
            self.skipped_rounds.append(rnd)
            return None
        # In partition order, not arrival order: float sums then do not depend on which client
        # finished first, so every backend (and every rerun) aggregates to the same bits.
        valid.sort(key=lambda m: int(m.content[protocol.METRICS][protocol.PARTITION_ID]))
        return valid

    def _wait_for_nodes(self, grid: Grid) -> list[int]:
        deadline = time.monotonic() + self.wait_for_nodes_s
        while len(nodes := list(grid.get_node_ids())) < self.min_available_nodes:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(nodes)} of {self.min_available_nodes} clients connected after "
                                   f"{self.wait_for_nodes_s:.0f} s; start the missing SuperNodes")
            log.info("waiting for clients: %d of %d connected", len(nodes), self.min_available_nodes)
            time.sleep(1)
        return nodes
