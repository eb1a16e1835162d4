"""GCond arbitration inside a continual learner: the surrogate's gradient is the arbitrated one."""

from types import SimpleNamespace

import pytest
import torch

from lifelong.bridges.avalanche.arbitration import GCondArbitrationPlugin
from lifelong.config import ConfigError, load_config
from lifelong.strategies.combiners.gcond import GCond


def fake_strategy(model, x, y, extra_penalty):
    out = model(x)
    loss = torch.nn.functional.cross_entropy(out, y) + extra_penalty(model)
    return SimpleNamespace(model=model, mb_output=out, mb_y=y, loss=loss)


def test_penalty_mode_writes_the_arbitrated_gradient():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    anchor = {k: v.detach() + 1.0 for k, v in model.named_parameters()}
    penalty = lambda m: 5 * sum(((p - anchor[k]) ** 2).sum() for k, p in m.named_parameters())  # noqa: E731
    x, y = torch.randn(8, 3), torch.randint(0, 2, (8,))
    s = fake_strategy(model, x, y, penalty)
    plugin = GCondArbitrationPlugin("penalty")
    plugin.before_backward(s)
    s.loss.backward()
    got = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    # independent: the two gradients by autograd, arbitrated by a fresh GCond
    model.zero_grad()
    params = list(model.parameters())
    out = model(x)
    g1 = torch.autograd.grad(torch.nn.functional.cross_entropy(out, y), params, retain_graph=True)
    g2 = torch.autograd.grad(penalty(model), params)
    flat = [torch.cat([g.reshape(-1) for g in gs]) for gs in (g1, g2)]
    want = GCond().combine(flat)
    assert torch.allclose(got, want, atol=1e-6)
    assert plugin.arbitrated == 1


def test_replay_mode_waits_for_a_memory_and_splits_the_batch():
    model = torch.nn.Linear(3, 2)
    x, y = torch.randn(6, 3), torch.tensor([0, 0, 0, 0, 1, 1])
    replay = SimpleNamespace(storage_policy=SimpleNamespace(buffer=[]))
    plugin = GCondArbitrationPlugin("replay", batch_size_mem=2, replay=replay)
    s = fake_strategy(model, x, y, lambda m: 0.0)
    before = s.loss
    plugin.before_backward(s)
    assert s.loss is before and plugin.arbitrated == 0  # empty memory: plain training
    replay.storage_policy.buffer = [1, 2, 3]
    plugin.before_backward(s)
    assert plugin.arbitrated == 1 and s.loss is not before


def test_config_refuses_arbitration_without_its_second_objective():
    with pytest.raises(ConfigError, match="'replay' needs the replay strategy"):
        load_config(None, ['strategies=[{name="naive", arbitrate="gcond"}]'])
    with pytest.raises(ConfigError, match="'penalty' needs at least one regulariser"):
        load_config(None, ['strategies=[{name="naive", arbitrate="gcond", arbitrate_between="penalty"}]'])
