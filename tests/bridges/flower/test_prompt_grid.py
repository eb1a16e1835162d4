"""The deployed ServerApp's grid: every reply collected, a timeout kept, the rest Flower's grid's."""

import time
from types import SimpleNamespace

from lifelong.bridges.flower.prompt_grid import PromptGrid


class SlowLink:
    """A grid whose replies become available ``delay`` seconds after the push, one per message
    (message "m2" never answers)."""

    def __init__(self, delay: float):
        self.delay, self.pushed, self.pulls = delay, 0.0, 0
        self.run = "the run"

    def push_messages(self, messages):
        self.pushed = time.monotonic()
        return [m for m in messages]

    def pull_messages(self, ids):
        self.pulls += 1
        if time.monotonic() - self.pushed < self.delay:
            return []
        return [SimpleNamespace(metadata=SimpleNamespace(reply_to_message_id=i)) for i in ids if i != "m2"]

    def get_node_ids(self):
        return [1, 2]

    def anything_else(self):
        return "flower's"


def test_every_reply_is_collected_once_they_have_all_come():
    link = SlowLink(delay=0.3)
    replies = PromptGrid(link).send_and_receive(["m0", "m1"], timeout=None)
    assert sorted(r.metadata.reply_to_message_id for r in replies) == ["m0", "m1"]
    assert link.pulls >= 2  # it asked again while the replies were not there


def test_a_timeout_returns_the_replies_that_came():
    link = SlowLink(delay=0.0)
    t = time.monotonic()
    replies = PromptGrid(link).send_and_receive(["m0", "m2"], timeout=0.4)
    assert [r.metadata.reply_to_message_id for r in replies] == ["m0"]  # m0 once, m2 never
    assert time.monotonic() - t >= 0.4


def test_the_rest_is_the_wrapped_grids():
    grid = PromptGrid(SlowLink(delay=0.0))
    assert grid.run == "the run" and list(grid.get_node_ids()) == [1, 2] and grid.anything_else() == "flower's"
