"""FedAsync's staleness functions and mixing (Xie et al. 2020, §5.2, Algorithm 1) and FedBuff's
buffered step (Nguyen et al. 2022, Algorithm 1), against the papers' formulas by hand."""

import pytest
import torch

from lifelong.strategies.federated.staleness import (
    fedasync_mix,
    fedbuff_scale,
    fedbuff_step,
    staleness_weight,
)


def test_staleness_functions_follow_the_paper():
    assert staleness_weight(0, "constant") == staleness_weight(7, "constant") == 1.0
    # polynomial s_a(t - tau) = (t - tau + 1)^-a
    assert staleness_weight(0, "polynomial", a=0.5) == 1.0
    assert staleness_weight(3, "polynomial", a=0.5) == pytest.approx(0.5)        # 4^-1/2
    assert staleness_weight(7, "polynomial", a=1.0) == pytest.approx(1 / 8)
    # hinge s_{a,b}: 1 up to b, then 1 / (a (t - tau - b) + 1)
    assert staleness_weight(4, "hinge", a=10, b=4) == 1.0
    assert staleness_weight(6, "hinge", a=10, b=4) == pytest.approx(1 / 21)
    with pytest.raises(ValueError, match=">= 0"):
        staleness_weight(-1)
    with pytest.raises(ValueError, match="must be > 0"):
        staleness_weight(1, "polynomial", a=0)


def test_fedasync_mixes_with_alpha_times_s():
    server = {"w": torch.tensor([0.0, 4.0]), "n": torch.tensor(3)}
    client = {"w": torch.tensor([2.0, 0.0]), "n": torch.tensor(9)}
    # alpha 0.6, staleness 3, polynomial a = 0.5: alpha_t = 0.6 * 0.5 = 0.3
    out = fedasync_mix(server, client, 0.6, 3)
    assert torch.allclose(out["w"], torch.tensor([0.6, 2.8]))
    assert int(out["n"]) == 3  # a non-float entry keeps the server's value
    with pytest.raises(ValueError, match=r"alpha must be in \(0, 1\]"):
        fedasync_mix(server, client, 1.5, 0)


def test_fedbuff_steps_with_the_scaled_mean_delta():
    server = {"w": torch.tensor([1.0, 1.0])}
    deltas = [{"w": torch.tensor([2.0, 0.0])}, {"w": torch.tensor([0.0, 4.0])}]
    # staleness 0 and 3: scales 1 and 1/sqrt(4) = 0.5; mean of [2, 0] and [0, 2] = [1, 1]; eta_g = 0.5
    out = fedbuff_step(server, deltas, [0, 3], server_lr=0.5)
    assert torch.allclose(out["w"], torch.tensor([1.5, 1.5]))
    assert fedbuff_scale(8) == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="one staleness per delta"):
        fedbuff_step(server, deltas, [0])
