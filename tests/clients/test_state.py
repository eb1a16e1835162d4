"""A client's memory survives a round trip through its Context.state records."""

import torch
from flwr.app import RecordDict

from lifelong.bridges.avalanche.worker import ClientReplayBuffer
from lifelong.clients import state as st
from lifelong.config import StreamConfig
from lifelong.tasks.streams import build_stream, experience_share


def stream():
    return build_stream(StreamConfig(), 0)


def samples(buffer):
    data = buffer.buffer.eval()
    return torch.stack([data[i][0] for i in range(len(data))]), torch.tensor([data[i][1] for i in range(len(data))])


def test_replay_memory_round_trip_keeps_samples_and_reservoir_weights():
    s = stream()
    torch.manual_seed(0)
    mem = ClientReplayBuffer(12)
    mem.add_experience(experience_share(s, 0, torch.arange(20)))
    mem.add_experience(experience_share(s, 1, torch.arange(20)))
    back = ClientReplayBuffer(12)
    back.load_state_dict(mem.state_dict())
    assert sorted(back.buffer_groups) == [0, 1]
    for g in (0, 1):
        assert torch.equal(back.buffer_groups[g]._buffer_weights, mem.buffer_groups[g]._buffer_weights)
    xa, ya = samples(mem)
    xb, yb = samples(back)
    assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_restored_memory_evolves_exactly_like_the_original():
    s = stream()
    torch.manual_seed(1)
    mem = ClientReplayBuffer(10)
    mem.add_experience(experience_share(s, 0, torch.arange(30)))
    back = ClientReplayBuffer(10)
    back.load_state_dict(mem.state_dict())
    for m in (mem, back):  # the same draws for the next experience: the same kept samples
        torch.manual_seed(2)
        m.add_experience(experience_share(s, 1, torch.arange(30)))
    assert [len(g.buffer) for g in mem.buffer_groups.values()] == [5, 5]
    assert torch.equal(samples(mem)[0], samples(back)[0])


def test_memory_is_not_updated_by_training_rounds():
    s = stream()
    mem = ClientReplayBuffer(10)
    mem.post_adapt(None, experience_share(s, 0, torch.arange(30)))  # what ReplayPlugin calls
    assert len(mem.buffer_groups) == 0


def test_progress_and_tensors_live_in_the_record_dict():
    state = RecordDict()
    assert st.read_progress(state) == {"trained": -1, "consolidated": -1}
    st.write_progress(state, 3, 2)
    assert st.read_progress(state) == {"trained": 3, "consolidated": 2}
    assert st.read_tensors(state, st.reg_key(0)) is None
    st.write_tensors(state, st.reg_key(0), {"fisher0/w": torch.ones(2, 2), "count": torch.tensor(1)})
    back = st.read_tensors(state, st.reg_key(0))
    assert torch.equal(back["fisher0/w"], torch.ones(2, 2)) and int(back["count"]) == 1
