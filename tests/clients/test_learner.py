"""A client's continual learner: lazy consolidation at experience boundaries, state in Context.state."""

import pytest
import torch
from flwr.app import RecordDict

from lifelong.clients import state as st
from lifelong.clients.learner import ClientLearner, frozen_keys
from lifelong.config import load_config
from lifelong.flows.federated import initial_weights
from lifelong.strategies.regularizers.ewc import EWC
from lifelong.tasks.partition import client_indices, experience_labels
from lifelong.tasks.streams import build_stream


def config(*extra):
    return load_config(None, ['flow="federated"', 'model.name="mlp"', "model.hidden=16", "training.epochs=1",
                              "federated.clients=4", "federated.rounds=2", "stream.n_experiences=5", *extra])


def test_client_shares_are_disjoint_and_cover_the_experience():
    cfg = config()
    s = build_stream(cfg.stream, cfg.seed)
    parts = client_indices(cfg, s, 1)
    joined = torch.cat(parts)
    assert len(parts) == 4 and len(joined) == len(set(joined.tolist())) == len(s.train_stream[1].dataset)


def test_ewc_consolidates_once_per_experience_when_the_next_one_starts():
    cfg = config('strategies=[{name="naive", plugins=[{name="ewc", lam=10.0}]}]')
    state = RecordDict()
    w = initial_weights(cfg)
    client = ClientLearner(cfg, 1, state)
    w, _ = client.train_round(w, 0, 1)
    w, _ = client.train_round(w, 0, 2)  # a second round of the same experience: nothing consolidated
    assert st.read_progress(state) == {"trained": 0, "consolidated": -1}
    assert int(st.read_tensors(state, st.reg_key(0))["count"]) == 0
    received = {k: v.clone() for k, v in w.items()}
    w, m = client.train_round(w, 1, 3)  # first round of experience 1: consolidate experience 0
    assert st.read_progress(state) == {"trained": 1, "consolidated": 0}
    ewc = EWC(10.0)
    ewc.load_state_dict(st.read_tensors(state, st.reg_key(0)))
    assert len(ewc.fishers) == 1
    # The anchor is the global model the client received at the boundary.
    assert all(torch.equal(ewc.anchors[0][k], received[k]) for k in ewc.anchors[0])
    assert m["experience"] == 1 and m["partition-id"] == 1 and m["num-examples"] > 0


def test_replay_memory_grows_one_group_per_finished_experience():
    cfg = config('strategies=[{name="replay", mem_size=20}]')
    state = RecordDict()
    w = initial_weights(cfg)
    client = ClientLearner(cfg, 0, state)
    for exp, rnd in [(0, 1), (0, 2), (1, 3), (1, 4), (2, 5)]:
        w, _ = client.train_round(w, exp, rnd)
    groups = {k.split("/")[0] for k in st.read_tensors(state, st.REPLAY)}
    assert groups == {"0", "1"}  # experiences 0 and 1 finished; 2 is being trained


def test_a_client_skipped_for_an_experience_consolidates_the_one_it_trained():
    cfg = config('strategies=[{name="replay", mem_size=20}]')
    state = RecordDict()
    w = initial_weights(cfg)
    client = ClientLearner(cfg, 2, state)
    w, _ = client.train_round(w, 0, 1)
    w, _ = client.train_round(w, 2, 5)  # not sampled during experience 1
    assert st.read_progress(state) == {"trained": 2, "consolidated": 0}
    assert {k.split("/")[0] for k in st.read_tensors(state, st.REPLAY)} == {"0"}


def test_same_seed_same_round_same_update():
    cfg = config()
    w = initial_weights(cfg)
    a, _ = ClientLearner(cfg, 3, RecordDict()).train_round(w, 0, 1)
    b, _ = ClientLearner(cfg, 3, RecordDict()).train_round(w, 0, 1)
    c, _ = ClientLearner(cfg, 3, RecordDict()).train_round(w, 0, 2)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)  # another round draws other batches


def test_consolidation_anchors_to_the_boundary_model_when_given():
    cfg = config('strategies=[{name="naive", plugins=[{name="ewc", lam=10.0}]}]')
    state = RecordDict()
    w = initial_weights(cfg)
    client = ClientLearner(cfg, 0, state)
    end_of_exp0, _ = client.train_round(w, 0, 1)
    drifted = {k: v + 1.0 for k, v in end_of_exp0.items()}  # the federation moved on meanwhile
    client.train_round(drifted, 1, 4, boundary=end_of_exp0)
    ewc = EWC(10.0)
    ewc.load_state_dict(st.read_tensors(state, st.reg_key(0)))
    assert all(torch.equal(ewc.anchors[0][k], end_of_exp0[k]) for k in ewc.anchors[0])


def test_a_failed_round_leaves_the_client_state_as_it_was(monkeypatch):
    cfg = config('strategies=[{name="replay", mem_size=20, plugins=[{name="ewc", lam=10.0}]}]')
    state = RecordDict()
    w = initial_weights(cfg)
    client = ClientLearner(cfg, 0, state)
    w, _ = client.train_round(w, 0, 1)
    before = {k: dict(state[k]) if k == st.PROGRESS else st.read_tensors(state, k) for k in state.keys()}
    import lifelong.clients.learner as cl
    def crash(*args, **kwargs):
        raise RuntimeError("out of memory")

    worker = cl.worker_for(cfg, client.stream)
    monkeypatch.setattr(worker.strategy, "train", crash)
    with pytest.raises(RuntimeError):  # fails after consolidating experience 0
        client.train_round(w, 1, 3)
    assert set(state.keys()) == set(before)
    assert st.read_progress(state) == {"trained": 0, "consolidated": -1}
    assert int(st.read_tensors(state, st.reg_key(0))["count"]) == 0
    monkeypatch.undo()
    client.train_round(w, 1, 3)  # the retry consolidates experience 0 exactly once
    ewc = EWC(10.0)
    ewc.load_state_dict(st.read_tensors(state, st.reg_key(0)))
    assert len(ewc.fishers) == 1
    assert {k.split("/")[0] for k in st.read_tensors(state, st.REPLAY)} == {"0"}


def test_frozen_keys_are_the_parameters_a_clients_round_never_changes():
    probe = config('strategies=[{name="naive", freeze_backbone=true}]')
    stream = build_stream(probe.stream, probe.seed)
    w = initial_weights(probe)
    frozen = frozen_keys(probe, stream)
    assert frozen and frozen == {k for k in w if k.startswith("backbone.")}
    new, _ = ClientLearner(probe, 0, RecordDict()).train_round(w, 0, 1)
    assert all(torch.equal(new[k], w[k]) == (k in frozen) for k in w)  # the rest (the head) trained
    # fine-tuning trains every parameter; the input standardisation's buffers are the stream's constants
    assert frozen_keys(config(), stream) == {"backbone.0.mean", "backbone.0.std"}


def test_gcond_arbitration_is_refused_for_federated_runs():
    from lifelong.config import ConfigError

    with pytest.raises(ConfigError, match="arbitrate: GCond arbitration keeps per-learner state"):
        config('strategies=[{name="replay", arbitrate="gcond"}]')


@pytest.mark.parametrize("strategy, keeps", [
    ('{name="naive"}', False),  # reads nothing back: no client-state files
    ('{name="replay", mem_size=10}', True),
    ('{name="naive", plugins=[{name="l2", eps=1.0}]}', True),
])
def test_only_learners_that_read_their_state_back_keep_it(strategy, keeps):
    assert ClientLearner(config(f"strategies=[{strategy}]"), 0, RecordDict()).keeps_state is keeps


def test_share_batches_cover_the_share_once_per_epoch_in_a_seeded_order():
    from lifelong.bridges.avalanche.worker import TensorBatches

    x, y = torch.arange(10.0).unsqueeze(1), torch.arange(10)
    batches = TensorBatches((x, y, torch.zeros(10, dtype=torch.long)), 4)
    torch.manual_seed(0)
    first = list(batches)
    assert len(batches) == len(first) == 3 and [len(b[0]) for b in first] == [4, 4, 2]
    assert sorted(torch.cat([b[1] for b in first]).tolist()) == list(range(10))
    assert all(torch.equal(b[0].squeeze(1).long(), b[1]) for b in first)  # x and y stay paired
    torch.manual_seed(0)
    assert all(torch.equal(a[1], b[1]) for a, b in zip(first, batches))


def test_a_naive_client_trains_on_its_share_as_tensor_batches():
    from lifelong.clients.learner import worker_for

    cfg = config('strategies=[{name="naive"}]', "training.batch_size=8")
    client = ClientLearner(cfg, 2, RecordDict())
    seen = []
    worker = worker_for(cfg, client.stream)
    hook = worker.model.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach().clone()))
    try:
        client.train_round(initial_weights(cfg), 1, 1)
    finally:
        hook.remove()
    share = torch.stack([s[0] for s in client.share(1).dataset.eval()])
    assert all(len(b) <= 8 for b in seen)
    assert sorted(map(tuple, torch.cat(seen).flatten(1).tolist())) == sorted(map(tuple, share.flatten(1).tolist()))
    assert worker_for(config('strategies=[{name="replay", mem_size=10}]'), client.stream).batches is None


def test_a_task_stream_model_has_every_head_from_the_start_and_keeps_its_keys():
    """FedAvg needs one key set: the server's model and every client's, before and after training
    on each experience, hold the same tensors (one head and class mask per task); a client's round
    trains its experience's head with the share's task labels and leaves the other heads alone."""
    from lifelong.clients.learner import worker_for
    from lifelong.tasks.models import build_stream_model

    cfg = config('stream.scenario="task"')
    stream = build_stream(cfg.stream, cfg.seed)

    def layout(weights):
        return {k: (tuple(v.shape), v.dtype) for k, v in weights.items()}

    w = initial_weights(cfg)
    server = build_stream_model(cfg.model, stream).state_dict()
    assert layout(w) == layout(server) == layout(worker_for(cfg, stream).model.state_dict())
    heads = {k.split(".")[2] for k in w if k.startswith("head.classifiers.")}
    assert heads == {"0", "1", "2", "3", "4"}
    for e, classes in enumerate(stream.classes_per_experience):  # each task's mask: its own classes
        assert torch.nonzero(w[f"head.active_units_T{e}"]).flatten().tolist() == classes
    client = ClientLearner(cfg, 0, RecordDict())
    for e in range(stream.n_experiences):
        new, _ = client.train_round(w, e, e + 1)
        assert layout(new) == layout(w)
        changed = [k for k in new if not torch.equal(new[k], w[k])]
        trained = {k.split(".")[2] for k in changed if k.startswith("head.classifiers.")}
        assert trained == {str(e)}
        assert all(torch.equal(new[k], w[k]) for k in new if "active_units" in k)
        w = new


def test_a_client_on_a_task_stream_consolidates_with_the_finished_tasks_labels():
    """EWC's Fisher of a finished experience is computed through that task's head (the share's
    task labels): the other heads get none; the replay memory keeps each sample's task label."""
    cfg = config('stream.scenario="task"',
                 'strategies=[{name="replay", mem_size=20, plugins=[{name="ewc", lam=1.0}]}]')
    state = RecordDict()
    w = initial_weights(cfg)
    client = ClientLearner(cfg, 0, state)
    for exp, rnd in [(0, 1), (1, 2), (2, 3)]:  # experience 2's first round consolidates experience 1
        w, _ = client.train_round(w, exp, rnd)
    ewc = EWC(1.0)
    ewc.load_state_dict(st.read_tensors(state, st.reg_key(0)))
    fisher = ewc.fishers[-1]
    on_head = {k.split(".")[2] for k, f in fisher.items() if k.startswith("head.") and f.abs().sum() > 0}
    assert on_head == {"1"}
    assert fisher["backbone.2.weight"].abs().sum() > 0  # the first linear layer (after standardise, flatten)
    memory = st.read_tensors(state, st.REPLAY)
    assert memory["0/t"].unique().tolist() == [0] and memory["1/t"].unique().tolist() == [1]


# --------------------------------------------------------------------------- OnePrompt / OVOR

VIT = ['model.name="vit"', "model.vit_dim=16", "model.vit_depth=1", "model.vit_heads=2", "model.vit_patch=4",
       "stream.n_experiences=2", "federated.clients=2"]


def oneprompt_config(*extra):
    return config(*VIT, 'strategies=[{name="oneprompt", vor_epochs=1, outliers_per_class=5}]', *extra)


def part(weights, prefix):
    return {k: v for k, v in weights.items() if k.startswith(prefix)}


def same(a, b) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_oneprompt_runs_vor_only_in_the_round_that_ends_the_experience():
    cfg = oneprompt_config()
    w = initial_weights(cfg)
    mid, m_mid = ClientLearner(cfg, 0, RecordDict()).train_round(w, 0, 2)
    end, m_end = ClientLearner(cfg, 0, RecordDict()).train_round(w, 0, 2, ends_experience=True)
    assert (m_mid["vor-ran"], m_end["vor-ran"]) == (0, 1)
    # The same round's phase A, then phase B on the head alone: prompts alike, heads not.
    assert same(part(mid, "prompt."), part(end, "prompt."))
    assert not same(part(w, "prompt."), part(mid, "prompt."))
    assert not same(part(mid, "head."), part(end, "head."))
    # The frozen backbone comes back as it was sent, bit for bit.
    assert same(part(end, "backbone."), part(w, "backbone."))
    assert same(part(mid, "backbone."), part(w, "backbone."))


def test_oneprompt_masks_classes_by_the_stream_not_by_the_clients_share():
    """A client whose share lacks one of the experience's classes, training experience 1 without
    having trained experience 0, masks experience 0's classes and predicts exactly 0-9."""
    cfg = oneprompt_config('federated.partition="shards"', "federated.shards_per_client=1")
    stream = build_stream(cfg.stream, cfg.seed)
    held = set(experience_labels(stream.train_stream[1])[client_indices(cfg, stream, 1)[0]].tolist())
    assert held < set(stream.classes_per_experience[1])  # the share lacks a current class
    w = initial_weights(cfg)
    new, _ = ClientLearner(cfg, 0, RecordDict()).train_round(w, 1, 3)
    earlier = stream.classes_per_experience[0]
    # Earlier classes' logits are masked: their head rows get no gradient (Adam leaves them as they were).
    assert torch.equal(new["head.weight"][earlier], w["head.weight"][earlier])
    missing = sorted(set(stream.classes_per_experience[1]) - held)
    assert not torch.equal(new["head.weight"][missing], w["head.weight"][missing])  # current, though absent
    assert new["active"].dtype == torch.bool and new["active"].all()  # experiences 0 and 1: all 10 classes
    first, _ = ClientLearner(cfg, 1, RecordDict()).train_round(w, 0, 1)
    assert first["active"].tolist() == [c in earlier for c in range(10)]  # not the global model's all-True


def test_seed_round_draws_what_avalanches_rng_manager_draws():
    import random

    import numpy as np
    import torch
    from avalanche.training.determinism.rng_manager import RNGManager

    from lifelong.bridges.avalanche.worker import seed_round

    def draws():
        return torch.rand(3).tolist(), np.random.rand(3).tolist(), [random.random() for _ in range(3)]

    RNGManager.set_random_seeds(1234)
    expected = draws()
    seed_round(1234)
    assert draws() == expected
    seed_round(1235)
    assert draws() != expected


def test_weights_returned_are_the_callers_own_unless_copy_is_false():
    from lifelong.clients.learner import worker_for

    cfg = config()
    w = initial_weights(cfg)
    own, _ = ClientLearner(cfg, 0, RecordDict()).train_round(w, 0, 1)
    kept = {k: v.clone() for k, v in own.items()}
    live, _ = ClientLearner(cfg, 1, RecordDict()).train_round(w, 0, 1, copy=False)
    model = worker_for(cfg, build_stream(cfg.stream, cfg.seed)).model
    # copy=False: the worker model's own tensors (what the ClientApp encodes at once) ...
    assert all(live[k].data_ptr() == v.data_ptr() for k, v in model.state_dict().items())
    ClientLearner(cfg, 2, RecordDict()).train_round(w, 0, 1)
    assert not all(torch.equal(live[k], kept[k]) for k in kept)  # ... overwritten by the next round
    assert all(torch.equal(own[k], kept[k]) for k in kept)  # a copy is not


def test_a_clients_share_is_built_once_per_experience():
    from lifelong.tasks.partition import client_share

    cfg = config()
    s = build_stream(cfg.stream, cfg.seed)
    first = client_share(cfg, s, 1, 2)
    assert client_share(cfg, s, 1, 2) is first
    assert sorted(first.dataset.targets) == sorted(s.train_stream[1].dataset.targets[i]
                                                   for i in client_indices(cfg, s, 1)[2].tolist())
    other = client_share(cfg, s, 2, 2)
    assert other is not first and other.current_experience == 2
    assert client_share(cfg, s, 1, 2) is not first  # one experience's shares are kept at a time


@pytest.mark.parametrize("extra", [
    ['strategies=[{name="naive", plugins=[{name="ewc", lam=1.0}]}]'],  # tensor batches, a regulariser
    ['stream.scenario="task"', 'federated.partition="dirichlet"', "federated.alpha=0.1"],  # batches, task heads
    ['stream.scenario="task"', 'strategies=[{name="replay", mem_size=20}]'],  # task heads, replay's loader
    ["privacy.sample={noise_multiplier=1.0, max_grad_norm=1.0, delta=1e-5}"],  # Opacus swaps the optimizer
    [*VIT, 'strategies=[{name="oneprompt", vor_epochs=1, outliers_per_class=5}]'],  # a frozen backbone
], ids=["ewc", "task-naive", "task-replay", "sample-dp", "oneprompt"])
def test_the_workers_template_trains_as_avalanches_naive(monkeypatch, extra):
    """WorkerNaive runs Avalanche's model and optimizer check once and builds no dataloader when
    tensor batches replace it. Under Avalanche's own Naive, every check after a worker's first
    changes nothing (weights, masks, parameters, optimizer), and several clients' rounds across
    experience boundaries give the same weights, bit for bit, with either template."""
    from avalanche.training import Naive
    from avalanche.training.templates.observation_type.batch_observation import BatchObservation

    from lifelong.bridges.avalanche import worker

    def snapshot(strategy):
        opt = strategy.optimizer
        return ({k: v.clone() for k, v in strategy.model.state_dict().items()},
                [id(p) for p in strategy.model.parameters()],
                [[id(p) for p in g["params"]] for g in opt.param_groups], id(opt.state), list(opt.state))

    checks, changes = [], []
    check = BatchObservation.check_model_and_optimizer

    def spy(self, **kwargs):
        before = snapshot(self)
        check(self, **kwargs)
        after = snapshot(self)
        checks.append(self)
        if sum(c is self for c in checks) > 1:  # a worker's later checks
            changes.append(not same(before[0], after[0]) or before[1:] != after[1:])

    monkeypatch.setattr(BatchObservation, "check_model_and_optimizer", spy)
    cfg = config(*extra)
    n_exp = build_stream(cfg.stream, cfg.seed).n_experiences

    def rounds():
        worker.workers.clear()
        states = [RecordDict() for _ in range(2)]
        w, out = initial_weights(cfg), []
        for rnd, (exp, pid) in enumerate([(e, p) for e in range(min(n_exp, 3)) for p in (0, 1)], start=1):
            w, _ = ClientLearner(cfg, pid, states[pid]).train_round(w, exp, rnd, ends_experience=pid == 1)
            out.append(w)
        return type(worker.worker_for(cfg, build_stream(cfg.stream, cfg.seed)).strategy), out

    template, fast = rounds()
    fast_checks = len(checks)
    monkeypatch.setattr(worker, "WorkerNaive", Naive)
    plain_template, plain = rounds()
    worker.workers.clear()
    assert (template.__name__, plain_template) == ("WorkerNaive", Naive)
    assert (fast_checks, len(checks) - fast_checks) == (1, len(fast))  # once, against every round
    assert len(changes) == len(fast) - 1 and not any(changes)  # Naive's later checks: no-ops
    assert len(fast) == len(plain) and all(same(a, b) for a, b in zip(fast, plain))


def test_a_stream_models_heads_need_no_adaptation_afterwards():
    """WorkerNaive's premise for task streams: the model ``build_stream_model`` makes (the server's,
    and every worker's) already has each experience's head and class mask, so Avalanche's
    adaptation to any training experience, in training mode, changes nothing."""
    from avalanche.models.dynamic_modules import avalanche_model_adaptation

    from lifelong.tasks.models import build_stream_model

    cfg = config('stream.scenario="task"')
    stream = build_stream(cfg.stream, cfg.seed)
    model = build_stream_model(cfg.model, stream).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    params = [id(p) for p in model.parameters()]
    for experience in reversed(list(stream.train_stream)):
        avalanche_model_adaptation(model, experience)
    assert same(before, model.state_dict()) and [id(p) for p in model.parameters()] == params
