"""The in-process simulation backend: a Flower ``Grid`` that runs the ClientApp in this process.

Flower's simulation engine runs each ClientApp call in a Ray actor and the ServerApp polls a
state store for replies (a floor of ~1 s a round and ~600 MB an actor). Here, as in
pfl-research's simulator, the ServerApp's messages are handed straight to the *same*
``ClientApp`` object, one sampled client after another, and the replies returned at once: no
actors, no serialisation, no polling.

Clients are virtual until sampled: a node is an id and a partition id; its ``Context`` (with the
persistent ``state`` where the client keeps its continual-learning memory) is created the first
time a message reaches it. A ClientApp that raises gets an error reply, as Flower's engine gives
one, so the strategy counts it as a failure and the round goes on.

With ``release_states``, only a round's cohort is in memory: after a client's round in a
checkpointed run, which saved its state to the client state store (``clients/state_store.py``),
its Context is let go, and the next message to it starts from an empty one marked
``protocol.NODE_RELEASED``, from which the client reloads what it saved (``clients/round.py``).
A population of 10^5 virtual clients then costs the memory of the clients a round samples.
"""

from __future__ import annotations

import logging
import traceback
from collections.abc import Iterable
from uuid import uuid4

from flwr.app import Context, Message, RecordDict
from flwr.app.error import Error
from flwr.clientapp import ClientApp
from flwr.common.constant import SUPERLINK_NODE_ID, ErrorCode
from flwr.serverapp import Grid
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

from lifelong.bridges.flower import protocol

log = logging.getLogger("lifelong.clients")


class InProcessGrid(Grid):
    def __init__(self, client_app: ClientApp, num_nodes: int, run_id: int = 1, release_states: bool = False):
        self.client_app = client_app
        self.release_states = release_states
        self.released: set[int] = set()  # nodes whose Context was let go after a saved round
        self._run = Run.create_empty(run_id)
        # Node ids are fixed (partition id + 1), so client sampling is reproducible.
        self.partitions = {pid + 1: pid for pid in range(num_nodes)}
        self.num_nodes = num_nodes
        self.contexts: dict[int, Context] = {}  # only clients that have been sampled
        self.changed: set[int] = set()  # nodes whose state a round replaced since take_changed()
        self._replies: dict[str, Message] = {}
        # Messages are built with the identity of the task that sends them; Flower's runtime sets
        # it in its ServerApp process, and this grid's ServerApp runs in ours.
        TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = run_id, SUPERLINK_NODE_ID, 1

    # --- Grid API -------------------------------------------------------------------------
    def set_run(self, run: Run) -> None:
        self._run = run

    @property
    def run(self) -> Run:
        return self._run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str,
                       ttl: float | None = None) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.partitions)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = str(uuid4())
            self._replies[msg.metadata.message_id] = self._deliver(msg)
            ids.append(msg.metadata.message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self._replies.pop(i) for i in message_ids if i in self._replies]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        # Synchronous: every reply exists once its message is delivered, so there is nothing to
        # wait for (a client that hangs hangs the run; use the Ray backend or a deployment to
        # bound a round with round_timeout).
        return self.pull_messages(self.push_messages(messages))

    # --- running a client -----------------------------------------------------------------
    def context(self, node_id: int) -> Context:
        if node_id not in self.contexts:
            pid = self.partitions[node_id]
            node_config = {protocol.NODE_PARTITION_ID: pid, protocol.NUM_PARTITIONS: self.num_nodes}
            if node_id in self.released:
                node_config[protocol.NODE_RELEASED] = 1
            self.contexts[node_id] = Context(run_id=self._run.run_id, node_id=node_id, node_config=node_config,
                                             state=RecordDict(), run_config={})
        return self.contexts[node_id]

    def take_changed(self) -> dict[int, RecordDict]:
        """The ``Context.state`` of every client that trained since the last call, by node id
        (an incremental checkpoint: a client's state changes only when it trains)."""
        changed = {node: self.contexts[node].state for node in sorted(self.changed) if node in self.contexts}
        self.changed.clear()
        return changed

    def restore_states(self, states: dict[int, RecordDict]) -> None:
        """Give the clients back their saved states (a resumed run)."""
        self.contexts.clear()
        for node, state in states.items():
            ctx = self.context(node)
            self.contexts[node] = Context(run_id=ctx.run_id, node_id=node, node_config=ctx.node_config,
                                          state=state, run_config=ctx.run_config)

    @staticmethod
    def _may_release(msg: Message, reply: Message) -> bool:
        """Whether the client's Context may go after this reply: a successful round of a
        checkpointed run (``protocol.STATE_RUN``), where a client that keeps state saved it to
        its store, and one that keeps none reads nothing back."""
        conf = msg.content[protocol.CONFIG] if protocol.CONFIG in msg.content else {}
        return not reply.has_error() and protocol.STATE_RUN in conf

    def _deliver(self, msg: Message) -> Message:
        node_id = msg.metadata.dst_node_id
        ctx = self.context(node_id)
        # As Flower's engine does, the node's context is kept only if the app succeeds: the app
        # works on a copy of the state's record index (records are replaced, not mutated).
        trial = Context(run_id=ctx.run_id, node_id=node_id, node_config=ctx.node_config,
                        state=RecordDict({k: ctx.state[k] for k in ctx.state.keys()}), run_config=ctx.run_config)
        try:
            reply = self.client_app(msg, trial)
            self.contexts[node_id] = trial
            self.changed.add(node_id)
            if self.release_states and self._may_release(msg, reply):
                del self.contexts[node_id]
                self.released.add(node_id)
        except Exception as exc:  # as Flower's engine does: the failure becomes an error reply
            log.warning("client %d (partition %d) failed: %s", node_id, self.partitions[node_id], exc)
            log.debug(traceback.format_exc())
            reply = Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION,
                                  reason=f"{type(exc).__name__}: {exc}"), reply_to=msg)
        reply.metadata.__dict__["_message_id"] = str(uuid4())
        return reply
