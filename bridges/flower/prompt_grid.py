"""A deployed ServerApp's grid that collects replies as they arrive, not every 3 seconds.

Flower 1.42's grid for a deployed ServerApp (``flwr.superlink.grid.http_grid``) sends a round's
messages and then asks the SuperLink for the replies every 3 s (hard-coded), so each round waits
on average 1.5 s, and up to 3 s, after its last reply has arrived. ``PromptGrid`` wraps that grid
and asks again after 0.05 s, backing off (×1.5 an ask) to 0.5 s: a reply is seen within 0.5 s,
at the cost of a few more small requests to the SuperLink (at most 2 a second after the first).
Everything else is the wrapped grid's. (The SuperNode's own 3-second wait for new messages is in
``flower-supernode`` and stays: ``docs/federated.md``, "What a deployed round costs".)
"""

from __future__ import annotations

import time
from collections.abc import Iterable

from flwr.app import Message, RecordDict
from flwr.serverapp import Grid

FIRST_WAIT_S = 0.05
LONGEST_WAIT_S = 0.5


class PromptGrid(Grid):
    def __init__(self, grid: Grid):
        self.grid = grid

    def set_run(self, run) -> None:
        self.grid.set_run(run)

    @property
    def run(self):
        return self.grid.run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str,
                       ttl: float | None = None) -> Message:
        return self.grid.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:
        return self.grid.get_node_ids()

    def get_nodes(self):
        return self.grid.get_nodes()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self.grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self.grid.pull_messages(message_ids)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        """As Flower's: the replies that came within ``timeout`` seconds (None: wait for all)."""
        pending = set(self.push_messages(messages))
        end = None if timeout is None else time.monotonic() + timeout
        replies: list[Message] = []
        wait = FIRST_WAIT_S / 1.5
        while pending:
            got = list(self.pull_messages(pending))
            replies.extend(got)
            pending.difference_update(m.metadata.reply_to_message_id for m in got)
            if not pending or (end is not None and time.monotonic() >= end):
                break
            wait = min(LONGEST_WAIT_S, wait * 1.5)  # (at most 2 asks a second once replies are slow)
            time.sleep(wait if end is None else max(0.0, min(wait, end - time.monotonic())))
        return replies

    def __getattr__(self, name: str):  # anything else a caller reads from Flower's grid
        if name == "grid":  # not set yet (a copy being built): no recursion
            raise AttributeError(name)
        return getattr(self.grid, name)
