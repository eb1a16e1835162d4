"""Sample-level DP (Opacus DP-SGD) inside federated clients: each client its own privacy unit.

A client's accountant history lives in its ``Context.state`` and composes every round it trains
in; the worker lent to every client keeps nothing of one client for the next (accountant, hooks,
DP optimizer) and replies with plain parameter names.
"""

import json
import math

import pytest
import torch
from client_apps import interrupting_app
from flwr.app import RecordDict
from opacus.accountants import RDPAccountant

from lifelong.bridges.flower.protocol import SAMPLE_EPSILON
from lifelong.clients import state as st
from lifelong.clients.learner import ClientLearner, worker_for
from lifelong.config import ConfigError, load_config
from lifelong.flows.federated import initial_weights, run_federated
from lifelong.tracking import client_for

Z, DELTA, BATCH = 1.1, 1e-3, 32


def config(*extra):
    return load_config(None, ['flow="federated"', 'model.name="mlp"', "model.hidden=16", "training.epochs=1",
                              f"training.batch_size={BATCH}", "federated.clients=3", "federated.rounds=2",
                              "stream.n_experiences=2", 'strategies=[{name="naive", plugins=[{name="l2", eps=1.0}]}]',
                              f"privacy.sample={{noise_multiplier={Z}, max_grad_norm=1.0, delta={DELTA}}}", *extra])


def opacus_round(n: int, epochs: int = 1) -> tuple[float, float, int]:
    """One round of DP-SGD on a share of n samples, as Opacus' Poisson loader runs it:
    sample rate 1 / (batches of the plain loader), that many steps per epoch."""
    batches = math.ceil(n / BATCH)
    return Z, 1 / batches, epochs * batches


def independent_epsilon(history) -> float:
    acc = RDPAccountant()
    acc.history = list(history)
    return acc.get_epsilon(DELTA)


def test_a_clients_epsilon_composes_its_own_rounds_only():
    cfg = config()
    w = initial_weights(cfg)
    a, b = RecordDict(), RecordDict()
    _, m1 = ClientLearner(cfg, 0, a).train_round(w, 0, 1)
    _, mb = ClientLearner(cfg, 1, b).train_round(w, 0, 2)  # another client on the same worker in between
    learner = ClientLearner(cfg, 0, a)
    _, m2 = learner.train_round(w, 1, 3)  # client 0 sampled again, on the next experience

    n0, n1 = len(learner.share(0).dataset), len(learner.share(1).dataset)
    r0, r1 = opacus_round(n0), opacus_round(n1)
    expected = [r0, r1] if r0[1] != r1[1] else [(Z, r0[1], r0[2] + r1[2])]  # Opacus merges equal (z, q)
    assert st.read_accountant(a) == expected
    assert m1[SAMPLE_EPSILON] == pytest.approx(independent_epsilon([r0]), rel=1e-9)
    assert m2[SAMPLE_EPSILON] == pytest.approx(independent_epsilon([r0, r1]), rel=1e-9)
    assert m2[SAMPLE_EPSILON] > m1[SAMPLE_EPSILON]
    # Client 1 spent one round only: nothing of client 0's history came with the shared worker.
    rb = opacus_round(len(ClientLearner(cfg, 1, b).share(0).dataset))
    assert st.read_accountant(b) == [rb]
    assert mb[SAMPLE_EPSILON] == pytest.approx(independent_epsilon([rb]), rel=1e-9)
    assert math.isnan(m1["train-loss"])  # computed without noise: not sent


def test_the_reply_has_plain_names_and_the_worker_keeps_no_opacus_state():
    cfg = config()
    w = initial_weights(cfg)
    learner = ClientLearner(cfg, 2, RecordDict())
    weights, _ = learner.train_round(w, 0, 1)
    assert list(weights) == list(w) and not any("_module." in k for k in weights)
    worker = worker_for(cfg, learner.stream)
    assert type(worker.strategy.optimizer).__module__.startswith("torch.optim")  # not the DP optimizer
    assert not hasattr(worker.model, "autograd_grad_sample_hooks")
    for p in worker.model.parameters():
        assert not any(hasattr(p, a) for a in ("grad_sample", "summed_grad", "_forward_counter"))
    for m in worker.model.modules():
        assert not m._forward_hooks and not m._backward_hooks
    # and the same worker trains the next client: hooks would be refused if added twice
    ClientLearner(cfg, 0, RecordDict()).train_round(w, 0, 2)


def test_same_seed_same_private_update():
    cfg = config()
    w = initial_weights(cfg)
    a, _ = ClientLearner(cfg, 1, RecordDict()).train_round(w, 0, 1)
    b, _ = ClientLearner(cfg, 1, RecordDict()).train_round(w, 0, 1)
    c, _ = ClientLearner(config(f"privacy.sample={{noise_multiplier=0.0, max_grad_norm=1.0, delta={DELTA}}}"),
                         1, RecordDict()).train_round(w, 0, 1)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)  # the noise is there


@pytest.mark.parametrize("extra, message", [
    (['strategies=[{name="replay", mem_size=20}]'],
     "strategies.0: replay cannot be combined with sample-level DP: replayed samples are drawn outside "
     "Poisson sampling and reused"),
    (['strategies=[{name="naive", plugins=[{name="ewc"}]}]'],
     "strategies.0: ewc cannot be combined with sample-level DP: its Fisher reads the finished "
     "experience's data without clipping or noise"),
    (['strategies=[{name="naive", plugins=[{name="center_loss"}]}]'],
     "strategies.0: center_loss cannot be combined with sample-level DP: its centers move with every "
     "batch's features"),
])
def test_federated_sample_dp_refuses_data_reading_regularisers(extra, message):
    with pytest.raises(ConfigError) as err:
        config(*extra)
    assert message in str(err.value)


def test_federated_sample_dp_combines_with_user_level_dp():
    cfg = config('privacy.clipping="flat"', "privacy.noise_multiplier=1.0")
    assert cfg.privacy.sample.noise_multiplier == Z and cfg.privacy.clipping == "flat"


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A tiny federated run (3 clients, 2 experiences, 1 round each) with sample-level and user-level DP."""
    tmp = tmp_path_factory.mktemp("fed-sample-dp")
    cfg = config("federated.rounds=1", f'tracking.uri="sqlite:///{tmp / "mlruns.db"}"', 'tracking.experiment="sdp"',
                 "tracking.log_model=false", "tracking.log_plots=false", 'privacy.clipping="flat"',
                 "privacy.noise_multiplier=0.5", "privacy.delta=1e-3")
    return cfg, run_federated(cfg), tmp


def sample_epsilon_max(cfg, run_id) -> list[tuple[int, float]]:
    history = client_for(cfg.tracking.uri).get_metric_history(run_id, "privacy/sample_epsilon_max")
    return sorted((m.step, m.value) for m in history)


@pytest.mark.integration
def test_a_federated_run_logs_each_rounds_sample_epsilon(finished):
    cfg, result, tmp = finished
    client = client_for(cfg.tracking.uri)
    assert client.get_run(result.run_id).info.status == "FINISHED"
    top = sample_epsilon_max(cfg, result.run_id)
    mean = sorted((m.step, m.value) for m in client.get_metric_history(result.run_id, "privacy/sample_epsilon_mean"))
    assert [s for s, _ in top] == [1, 2] and top[0][1] < top[1][1]
    assert all(a[1] <= b[1] for a, b in zip(mean, top))
    assert [m.step for m in client.get_metric_history(result.run_id, "privacy/epsilon")] == [1, 2]  # user-level
    table = json.loads(open(client.download_artifacts(result.run_id, "clients.json", str(tmp))).read())
    col = table["columns"].index("sample_epsilon")
    per_client = {}
    for row in table["data"]:
        per_client.setdefault(row[2], []).append((row[0], row[col]))
    assert sorted(per_client) == [0, 1, 2]
    for rounds in per_client.values():  # every client sampled in both rounds: its epsilon grows
        eps = [e for _, e in sorted(rounds)]
        assert len(eps) == 2 and eps[0] < eps[1]
    assert top[1][1] == pytest.approx(max(e for r, e in sum(per_client.values(), []) if r == 2))


@pytest.mark.integration
def test_a_resumed_run_keeps_each_clients_accountant(finished):
    cfg, result, _ = finished
    with pytest.raises(KeyboardInterrupt):
        run_federated(cfg, client_app=interrupting_app(2))  # round 1 checkpointed with the clients' state
    client = client_for(cfg.tracking.uri)
    run_id = client.search_runs([client.get_experiment_by_name("sdp").experiment_id],
                                order_by=["attributes.start_time DESC"], max_results=1)[0].info.run_id
    run_federated(cfg, resume=run_id)
    # Round 2 composes round 1's steps only if the accountant came back with the checkpoint.
    assert sample_epsilon_max(cfg, run_id) == sample_epsilon_max(cfg, result.run_id)
