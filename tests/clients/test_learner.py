"""A client's continual learner: lazy consolidation at experience boundaries, state in Context.state."""

import pytest
import torch
from flwr.app import RecordDict

from clients import state as st
from clients.learner import ClientLearner, client_indices
from flows.federated import initial_weights
from lifelong.config import load_config
from strategies.ewc import EWC
from tasks.partition import experience_labels
from tasks.streams import build_stream


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
    import clients.learner as cl

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


def test_gcond_arbitration_is_refused_for_federated_runs():
    from lifelong.config import ConfigError

    with pytest.raises(ConfigError, match="arbitrate: GCond arbitration keeps per-learner state"):
        config('strategies=[{name="replay", arbitrate="gcond"}]')


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
