"""The Flower ClientApp (Message API): a continual learner on the node's private data.

What a train message holds and what the reply says is in ``clients/round.py``, which trains the
round. Where it trains depends on the process:

* in-process backend and Flower's Ray engine: here, in this long-lived process;
* a deployed SuperNode (``flwr-clientapp``, a fresh process per message): in the node's warm
  worker (``clients/node_worker.py``), so this process imports Flower and nothing heavier —
  no PyTorch, Avalanche, MLflow or Prefect.

``flwr run .`` loads this app unchanged in both cases.

``LIFELONG_CLIENTAPP_PROFILE=FILE`` has every message append one JSON line to FILE: the process's
age when the message reached the app (its start-up: interpreter, Flower, pulling the message),
the seconds the app took, and the process's peak RSS (``make bench`` reads them).
"""

from __future__ import annotations

import json
import os
import resource
import time

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from lifelong.clients import node_worker

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    started = time.time()
    if node_worker.wanted():
        content = node_worker.call(msg.content, context.state, context.node_config)
    else:
        from lifelong.clients.round import train_reply  # the learning stack, only where it trains

        content = train_reply(msg.content, context.state, context.node_config)
    if profile := os.environ.get("LIFELONG_CLIENTAPP_PROFILE"):
        _profile(profile, started)
    return Message(content, reply_to=msg)


def _profile(path: str, started: float) -> None:
    import psutil

    line = {"pid": os.getpid(), "startup_s": started - psutil.Process().create_time(),
            "handle_s": time.time() - started,
            "peak_rss_mb": _peak_rss_mb(),
            "warm_worker": node_worker.wanted()}
    with open(path, "a") as f:
        f.write(json.dumps(line) + "\n")


def _peak_rss_mb() -> float:
    """This process's peak RSS. Linux's VmHWM, not ``ru_maxrss``: a process forked from a larger
    one reports the parent's size as its ``ru_maxrss`` even after ``exec``."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
