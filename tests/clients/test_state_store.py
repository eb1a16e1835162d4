"""A client's state on its own disk: what is kept after each round, what a resume loads, what is refused."""

import pytest
import torch
from flwr.app import RecordDict

from lifelong.bridges.flower.protocol import NODE_STATE_DIR
from lifelong.checkpoints import ResumeError
from lifelong.clients import state as st
from lifelong.clients import state_store as ss
from lifelong.config import load_config


@pytest.fixture
def cfg():
    return load_config(None, ['flow="federated"', 'model.name="mlp"', "federated.clients=2"])


def client_state(trained: int) -> RecordDict:
    state = RecordDict()
    st.write_progress(state, trained, trained - 1)
    st.write_tensors(state, st.REPLAY, {"0/x": torch.full((2, 3), float(trained))})
    return state


def test_each_round_is_saved_and_only_the_newest_checkpointed_one_is_kept(tmp_path, cfg):
    d = ss.client_dir(tmp_path, "run1", 0)
    ss.save(client_state(1), cfg, d, rnd=1, checkpointed=0)
    assert sorted(ss.saved_rounds(d)) == [1]
    ss.save(client_state(2), cfg, d, rnd=2, checkpointed=1)
    assert sorted(ss.saved_rounds(d)) == [1, 2]  # the server may die before its checkpoint of round 2
    ss.save(client_state(4), cfg, d, rnd=4, checkpointed=3)  # not sampled in round 3
    assert sorted(ss.saved_rounds(d)) == [2, 4]  # round 2's is the newest at or below round 3
    ss.save(client_state(5), cfg, d, rnd=5, checkpointed=4)
    assert sorted(ss.saved_rounds(d)) == [4, 5]


def test_a_resume_loads_the_newest_state_at_or_below_the_servers_round(tmp_path, cfg):
    d = ss.client_dir(tmp_path, "run1", 1)
    for r in (2, 4, 5):
        ss.save(client_state(r), cfg, d, rnd=r, checkpointed=0)
    state = RecordDict()
    assert ss.restore(state, cfg, d, resume_round=4) == 4
    assert st.read_progress(state) == {"trained": 4, "consolidated": 3}
    assert torch.equal(st.read_tensors(state, st.REPLAY)["0/x"], torch.full((2, 3), 4.0))
    assert sorted(ss.saved_rounds(d)) == [2, 4]  # round 5 is trained again by the resumed run
    assert ss.restore(RecordDict(), cfg, d, resume_round=1) is None  # it had not trained by round 1
    assert ss.restore(RecordDict(), cfg, ss.client_dir(tmp_path, "run1", 7), resume_round=9) is None


def test_a_corrupt_state_file_is_refused_naming_the_file(tmp_path, cfg):
    d = ss.client_dir(tmp_path, "run1", 0)
    path = ss.save(client_state(3), cfg, d, rnd=3, checkpointed=2)
    path.write_bytes(b"half a file")
    with pytest.raises(ResumeError, match=rf"^{ss.REFUSED}: checkpoint {path} is unreadable"):
        ss.restore(RecordDict(), cfg, d, resume_round=3)


def test_a_state_file_of_another_config_is_refused(tmp_path, cfg):
    d = ss.client_dir(tmp_path, "run1", 0)
    ss.save(client_state(3), cfg, d, rnd=3, checkpointed=2)
    other = load_config(None, ['flow="federated"', 'model.name="mlp"', "federated.clients=2", "training.lr=0.5"])
    with pytest.raises(ResumeError, match=r"different config \(differs in: training.lr\)"):
        ss.restore(RecordDict(), other, d, resume_round=3)


def test_the_state_root_is_the_nodes_then_the_environments_then_next_to_the_checkpoints(tmp_path, monkeypatch):
    monkeypatch.setenv("LIFELONG_HOME", str(tmp_path / "home"))
    monkeypatch.delenv(ss.ENV_VAR, raising=False)
    assert ss.state_root({}) == tmp_path / "home" / "client-state"
    monkeypatch.setenv(ss.ENV_VAR, str(tmp_path / "env"))
    assert ss.state_root({"partition-id": 0}) == tmp_path / "env"
    assert ss.state_root({NODE_STATE_DIR: str(tmp_path / "node")}) == tmp_path / "node"
    with pytest.raises(ValueError, match="not a plain name"):
        ss.client_dir(tmp_path, "../elsewhere", 0)
