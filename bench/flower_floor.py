"""Flower's own floor for a deployed round: what a round costs when the client does nothing.

The deployed-round target (issue 19: a deployed round within 1.5x an in-process one) is held
against this. A Flower app of a few lines, no project code: its ServerApp sends one message to
every node and waits for all the replies, round after round; its ClientApp replies at once. It
runs on the same kind of deployment as the bench's (a SuperLink and N SuperNodes on loopback,
``cli/deploy.py``, ``flwr run``), so a round here is what Flower 1.42 itself costs: a fresh
``flwr-clientapp`` process per message, the SuperNode's 3-second wait between polls when idle,
the SuperLink's message store. The ServerApp asks for replies every 0.05 s (Flower's own grid
waits 3 s between asks; Lifelong's ServerApp asks as often: ``bridges/flower/prompt_grid.py``),
so none of the floor is a wait the server could shorten. A round is timed inside the ServerApp,
from the push to the last reply; the deployed bench's rounds are the intervals between two rounds'
metrics in MLflow, which also hold the server's evaluation and checkpoint of the round, so the
floor, if anything, flatters the comparison against Lifelong's rounds.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

ROUNDS = 6

PYPROJECT = """[project]
name = "floor"
version = "1.0.0"
dependencies = []

[tool.flwr.app]
publisher = "lifelong-bench"

[tool.flwr.app.components]
serverapp = "floor_app:server"
clientapp = "floor_app:client"

[tool.flwr.app.config]
rounds = 1
nodes = 1
out = ""
"""

APP = '''"""A round that costs only Flower: the client replies at once."""

import json
import time
from pathlib import Path

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

client = ClientApp()
server = ServerApp()


@client.train()
def train(msg: Message, context: Context) -> Message:
    return Message(RecordDict({"metrics": MetricRecord({"ok": 1})}), reply_to=msg)


@server.main()
def main(grid: Grid, context: Context) -> None:
    rounds, nodes = int(context.run_config["rounds"]), int(context.run_config["nodes"])
    while len(list(grid.get_node_ids())) < nodes:
        time.sleep(0.2)
    seconds = []
    for r in range(rounds):
        t = time.monotonic()
        messages = [Message(RecordDict({"config": ConfigRecord({"round": r})}), dst_node_id=n,
                            message_type="train", group_id=str(r)) for n in grid.get_node_ids()]
        pending = set(grid.push_messages(messages))
        while True:
            replies = list(grid.pull_messages(pending))
            pending.difference_update(m.metadata.reply_to_message_id for m in replies)
            if not pending:
                break
            time.sleep(0.05)
        seconds.append(time.monotonic() - t)
    Path(str(context.run_config["out"])).write_text(json.dumps(seconds))
'''


def run(out_dir: Path, nodes: int, rounds: int = ROUNDS) -> dict:
    """Median seconds of a no-op round on ``nodes`` SuperNodes (the first round left out, as in
    the deployed bench)."""
    from lifelong.cli.deploy import LocalDeployment

    app = out_dir / "flower-floor-app"
    app.mkdir(parents=True, exist_ok=True)
    (app / "pyproject.toml").write_text(PYPROJECT)
    (app / "floor_app.py").write_text(APP)
    result = out_dir / "flower-floor.json"
    result.unlink(missing_ok=True)
    with LocalDeployment(out_dir / "flower-floor", num_nodes=nodes) as dep:
        run = dep.run_app(app, {"rounds": rounds, "nodes": nodes, "out": str(result)}, timeout=1800)
    if run["status"] != "finished:completed" or not result.exists():
        raise RuntimeError(f"the floor app ended {run['status']}; see {run['log']}")
    seconds = json.loads(result.read_text())
    return {"round_s": seconds, "round_median_s": statistics.median(seconds[1:] or seconds)}
