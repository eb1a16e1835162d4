"""ContinualFedAvg: Flower's FedAvg with seeded sampling, a minimum of results and per-client outcomes."""

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.app.error import Error

from lifelong.bridges.flower.fedavg import ContinualFedAvg
from lifelong.clients.inprocess import InProcessGrid  # sets the task identity Messages are built with
from lifelong.strategies.federated.server_optimizers import ServerOptimizer


class EchoApp:
    """A ClientApp stand-in: replies with fixed weights per partition (or fails)."""

    def __init__(self, weights, sizes, fail=()):
        self.weights, self.sizes, self.fail = weights, sizes, set(fail)

    def __call__(self, msg, context):
        pid = int(context.node_config["partition-id"])
        if pid in self.fail:
            raise RuntimeError(f"partition {pid} is down")
        metrics = MetricRecord({"num-examples": self.sizes[pid], "train-loss": float(pid), "partition-id": pid,
                                "experience": 0})
        arrays = self.weights[pid] if isinstance(self.weights[pid], dict) else {"w": self.weights[pid]}
        return Message(RecordDict({"arrays": ArrayRecord(arrays), "metrics": metrics}), reply_to=msg)


def run_round(strategy, grid, server_round=1):
    msgs = list(strategy.configure_train(server_round, ArrayRecord({"w": torch.zeros(2)}), ConfigRecord(), grid))
    replies = list(grid.send_and_receive(msgs))
    return msgs, replies


def test_fedavg_is_the_sample_weighted_mean():
    weights = [torch.tensor([1.0, 2.0]), torch.tensor([3.0, 6.0]), torch.tensor([-1.0, 0.0])]
    sizes = [10, 30, 60]
    grid = InProcessGrid(EchoApp(weights, sizes), 3)
    strategy = ContinualFedAvg(1.0, 1, 3, seed=0)
    _, replies = run_round(strategy, grid)
    arrays, metrics = strategy.aggregate_train(1, replies)
    expected = (10 * weights[0] + 30 * weights[1] + 60 * weights[2]) / 100  # by hand: [0.4, 2.0]
    assert torch.allclose(arrays.to_torch_state_dict()["w"], expected)
    assert torch.allclose(arrays.to_torch_state_dict()["w"], torch.tensor([0.4, 2.0]))
    assert metrics["train-loss"] == pytest.approx((0 * 10 + 1 * 30 + 2 * 60) / 100)


def test_integer_and_boolean_entries_keep_their_dtype():
    """Flower averages in float64; a mask the clients agree on (a multi-head model's int8
    ``active_units_T<t>``) comes back as it was, a bool as the weighted majority, a counter as the
    rounded weighted mean — each in its own dtype; floats are Flower's mean, untouched."""
    mask = torch.tensor([0, 0, 1, 1], dtype=torch.int8)
    clients = [([True, False], 3), ([True, True], 5), ([False, True], 8)]  # (flag, counter) per client
    replies = [{"w": torch.tensor([1.0, 2.0]), "head.active_units_T1": mask, "flag": torch.tensor(flag),
                "n": torch.tensor(n)} for flag, n in clients]
    grid = InProcessGrid(EchoApp(replies, [10, 30, 60]), 3)
    strategy = ContinualFedAvg(1.0, 1, 3, seed=0)
    global_model = ArrayRecord({"w": torch.zeros(2), "head.active_units_T1": mask,
                                "flag": torch.tensor([False, False]), "n": torch.tensor(0)})
    msgs = list(strategy.configure_train(1, global_model, ConfigRecord(), grid))
    out = strategy.aggregate_train(1, list(grid.send_and_receive(msgs)))[0].to_torch_state_dict()
    assert out["w"].dtype == torch.float32 and torch.equal(out["w"], torch.tensor([1.0, 2.0]))
    assert out["head.active_units_T1"].dtype == torch.int8
    assert out["head.active_units_T1"].tolist() == [0, 0, 1, 1]
    assert out["flag"].dtype == torch.bool and out["flag"].tolist() == [False, True]  # weights 0.4 and 0.9
    assert out["n"].dtype == torch.int64 and int(out["n"]) == 7  # 0.1 * 3 + 0.3 * 5 + 0.6 * 8 = 6.6


def test_aggregation_does_not_depend_on_reply_order():
    gen = torch.Generator().manual_seed(0)
    weights = [torch.randn(1000, generator=gen) * 10 ** i for i in range(5)]
    grid = InProcessGrid(EchoApp(weights, [7, 3, 11, 5, 2]), 5)
    strategy = ContinualFedAvg(1.0, 1, 5, seed=0)
    _, replies = run_round(strategy, grid)
    a = strategy.aggregate_train(1, replies)[0].to_torch_state_dict()["w"]
    b = strategy.aggregate_train(1, list(reversed(replies)))[0].to_torch_state_dict()["w"]
    assert torch.equal(a, b)


def test_sampling_is_seeded_per_round():
    grid = InProcessGrid(EchoApp([torch.zeros(2)] * 20, [1] * 20), 20)

    def sampled(seed, rnd):
        s = ContinualFedAvg(0.25, 1, 20, seed=seed)
        return [m.metadata.dst_node_id for m in s.configure_train(rnd, ArrayRecord({}), ConfigRecord(), grid)]

    assert sampled(0, 1) == sampled(0, 1)
    assert len(sampled(0, 1)) == 5 and len(set(sampled(0, 1))) == 5
    assert sampled(0, 1) != sampled(0, 2) or sampled(0, 1) != sampled(1, 1)


def test_a_failing_client_is_recorded_and_the_round_aggregates_the_rest():
    weights = [torch.tensor([1.0]), torch.tensor([100.0]), torch.tensor([3.0])]
    grid = InProcessGrid(EchoApp(weights, [1, 1, 1], fail={1}), 3)
    strategy = ContinualFedAvg(1.0, 2, 3, seed=0)
    _, replies = run_round(strategy, grid)
    assert sum(r.has_error() for r in replies) == 1
    arrays, _ = strategy.aggregate_train(1, replies)
    assert torch.allclose(arrays.to_torch_state_dict()["w"], torch.tensor([2.0]))
    failed = [o for o in strategy.outcomes if o.status == "failed"]
    assert len(failed) == 1 and failed[0].node_id == 2 and "partition 1 is down" in failed[0].reason


def test_an_error_the_superlink_sends_for_an_unavailable_node_is_that_nodes_outcome():
    """Flower's SuperLink answers a message to a node whose heartbeat expired with an error reply
    from its own node id (1), ``reply_to`` the message: the outcome is the dead node's ``failed``,
    not a failure of "node 1" and a ``lost`` of the dead node (one row each, before)."""
    from flwr.server.superlink.linkstate.utils import create_message_error_unavailable_res_message

    grid = InProcessGrid(EchoApp([torch.ones(1)] * 3, [1] * 3), 3)
    strategy = ContinualFedAvg(1.0, 1, 3, seed=0)
    msgs, replies = run_round(strategy, grid)
    dead = next(m for m in msgs if m.metadata.dst_node_id != 1)  # (the grid numbers its nodes from 1)
    error = create_message_error_unavailable_res_message(dead.metadata, "node_unavail")  # the SuperLink's own
    assert error.metadata.src_node_id == 1
    live = [r for r in replies if r.metadata.reply_to_message_id != dead.metadata.message_id]
    strategy.aggregate_train(1, [*live, error])
    assert [(o.node_id, o.status) for o in strategy.outcomes if o.status != "ok"] == [
        (dead.metadata.dst_node_id, "failed")]
    assert {o.node_id for o in strategy.outcomes} == {m.metadata.dst_node_id for m in msgs}


def test_too_few_results_keep_the_global_model():
    grid = InProcessGrid(EchoApp([torch.zeros(1)] * 3, [1] * 3, fail={0, 1}), 3)
    strategy = ContinualFedAvg(1.0, 2, 3, seed=0)
    _, replies = run_round(strategy, grid)
    assert strategy.aggregate_train(1, replies) == (None, None)
    assert strategy.skipped_rounds == [1]


def test_a_client_that_never_replies_is_counted_as_lost():
    grid = InProcessGrid(EchoApp([torch.ones(1)] * 3, [1] * 3), 3)
    strategy = ContinualFedAvg(1.0, 1, 3, seed=0)
    _, replies = run_round(strategy, grid)
    arrays, _ = strategy.aggregate_train(1, replies[:2])  # the third reply never came (timeout)
    assert arrays is not None
    lost = [o for o in strategy.outcomes if o.status == "lost"]
    assert len(lost) == 1


def test_error_reply_is_a_flower_error_message():
    grid = InProcessGrid(EchoApp([torch.ones(1)], [1], fail={0}), 1)
    strategy = ContinualFedAvg(1.0, 1, 1, seed=0)
    _, replies = run_round(strategy, grid)
    assert replies[0].has_error() and isinstance(replies[0].error, Error)
    assert replies[0].metadata.src_node_id == 1


def test_nodes_are_materialised_only_when_sampled():
    grid = InProcessGrid(EchoApp([torch.ones(1)] * 1000, [1] * 1000), 1000)
    strategy = ContinualFedAvg(0.01, 1, 1000, seed=0)
    run_round(strategy, grid)
    run_round(strategy, grid, 2)
    assert 10 <= len(grid.contexts) <= 20
    assert np.all([grid.contexts[n].node_config["partition-id"] == n - 1 for n in grid.contexts])


def test_a_client_gone_after_the_first_round_does_not_stall_the_next():
    grid = InProcessGrid(EchoApp([torch.ones(1)] * 3, [1] * 3), 3)
    strategy = ContinualFedAvg(1.0, 1, 3, seed=0, wait_for_nodes_s=0.5)
    run_round(strategy, grid)
    del grid.partitions[3]  # a SuperNode stopped
    msgs, replies = run_round(strategy, grid, 2)
    assert sorted(m.metadata.dst_node_id for m in msgs) == [1, 2]
    assert strategy.aggregate_train(2, replies)[0] is not None


def test_a_failed_client_keeps_its_previous_context_state():
    class Writer:
        def __call__(self, msg, context):
            context.state["progress"] = ConfigRecord({"n": 1})
            raise RuntimeError("after writing")

    grid = InProcessGrid(Writer(), 1)
    strategy = ContinualFedAvg(1.0, 1, 1, seed=0)
    run_round(strategy, grid)
    assert "progress" not in grid.context(1).state


class FrozenAndMaskApp:
    """Replies with ``w`` moved, ``frozen`` exactly as sent, and its own class mask and counter."""

    MASKS = [[True, True, False], [True, False, False], [True, False, True]]

    def __call__(self, msg, context):
        got = msg.content["arrays"].to_torch_state_dict()
        pid = int(context.node_config["partition-id"])
        metrics = MetricRecord({"num-examples": 2 ** pid, "train-loss": 0.0, "partition-id": pid,
                                "experience": 0})
        arrays = ArrayRecord({"w": got["w"] + pid + 1, "frozen": got["frozen"],
                              "mask": torch.tensor(self.MASKS[pid]), "count": got["count"] + 10 * (pid + 1)})
        return Message(RecordDict({"arrays": arrays, "metrics": metrics}), reply_to=msg)


@pytest.mark.parametrize("optimizer", ["fedavg", "lamb"])
def test_untouched_tensors_stay_bit_for_bit_and_non_float_ones_keep_their_dtype(optimizer):
    """A frozen backbone comes back as sent (the float mean of equal values is not always the
    value: LAMB would blow that last bit up into a trust-ratio step); a bool mask stays a bool
    mask, the weighted majority; a counter an integer, the rounded weighted mean."""
    frozen = torch.randn(1000, generator=torch.Generator().manual_seed(0))
    weights = [1 / 7, 2 / 7, 4 / 7]  # the sizes 1, 2, 4
    assert not np.array_equal(sum(frozen.numpy() * w for w in weights), frozen.numpy())  # Flower's mean
    sent = ArrayRecord({"w": torch.zeros(3), "frozen": frozen, "mask": torch.ones(3, dtype=torch.bool),
                        "count": torch.tensor(5)})
    strategy = ContinualFedAvg(1.0, 1, 3, seed=0, server_optimizer=ServerOptimizer(optimizer))
    grid = InProcessGrid(FrozenAndMaskApp(), 3)
    msgs = list(strategy.configure_train(1, sent, ConfigRecord(), grid))
    out = strategy.aggregate_train(1, list(grid.send_and_receive(msgs)))[0].to_torch_state_dict()
    assert torch.equal(out["frozen"], frozen)
    assert out["mask"].dtype == torch.bool and out["mask"].tolist() == [True, False, True]
    assert out["count"].dtype == torch.int64 and int(out["count"]) == round(5 + 10 * (1 + 2 * 2 + 4 * 3) / 7)
    assert not torch.equal(out["w"], torch.zeros(3))
