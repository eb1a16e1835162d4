"""ClientApps for tests: the real one (``clients.app``), made to fail or to stop the run."""

from flwr.clientapp import ClientApp

from lifelong.clients.app import train as client_train


def failing_client_app(bad_partition: int) -> ClientApp:
    """Client ``bad_partition`` raises (a client failure: the round goes on without it)."""
    app = ClientApp()

    @app.train()
    def train(msg, context):
        if int(context.node_config["partition-id"]) == bad_partition:
            raise RuntimeError("disk full")
        return client_train(msg, context)

    return app


def interrupting_app(at_round: int) -> ClientApp:
    """The run stops in global round ``at_round`` (not a client failure: as if the machine died)."""
    app = ClientApp()

    @app.train()
    def train(msg, context):
        conf = msg.content["config"]
        if int(conf["round-offset"]) + int(conf["server-round"]) == at_round:
            raise KeyboardInterrupt("the machine went down")
        return client_train(msg, context)

    return app


def recording_app(replies: list) -> ClientApp:
    """The real app; appends every reply's (global round, metrics) to ``replies`` (in-process backend)."""
    app = ClientApp()

    @app.train()
    def train(msg, context):
        conf = msg.content["config"]
        reply = client_train(msg, context)
        rnd = int(conf["round-offset"]) + int(conf["server-round"])
        replies.append((rnd, dict(reply.content["metrics"])))
        return reply

    return app


def rejoining_app(partition: int, at_round: int) -> ClientApp:
    """Client ``partition`` comes back in global round ``at_round`` with an empty ``Context.state``,
    as a SuperNode that died and was started again: its memory is only on its disk."""
    app = ClientApp()

    @app.train()
    def train(msg, context):
        conf = msg.content["config"]
        if (int(context.node_config["partition-id"]) == partition
                and int(conf["round-offset"]) + int(conf["server-round"]) == at_round):
            for key in list(context.state.keys()):
                del context.state[key]
        return client_train(msg, context)

    return app
