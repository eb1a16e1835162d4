"""strategies/ovor.py: energy, VOR loss, NPOS outliers, threshold calibration, head-only VOR training."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lifelong.strategies.ovor import (
    VORConfig,
    boundary_indices,
    calibrate_thresholds,
    energy,
    kth_nn_distance,
    synthesize_outliers,
    train_head_with_vor,
    vor_loss,
)

CURRENT, SEEN = [2, 3, 4], [0, 1, 2, 3, 4]


def spherical_clusters(n_per_class: int = 60, dim: int = 16, seed: int = 0):
    """Three classes on the sphere of radius sqrt(dim), like final-LayerNorm features."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(len(CURRENT), dim, generator=g)
    x = centres.repeat_interleave(n_per_class, 0) + 0.3 * torch.randn(len(CURRENT) * n_per_class, dim, generator=g)
    y = torch.tensor(CURRENT).repeat_interleave(n_per_class)
    return F.normalize(x, dim=1) * math.sqrt(dim), y


def test_energy_matches_hand_computation():
    logits = torch.tensor([[0.0, 100.0, math.log(2.0), math.log(3.0)]])
    # columns 2 and 3 only: -log(2 + 3); the large column 1 is ignored
    assert energy(logits, [2, 3]).item() == pytest.approx(-math.log(5.0))


def test_vor_loss_hinge_and_huber_terms():
    y = torch.tensor([2])
    ood = torch.zeros(1, 5)  # E_ood = -log 3 ≈ -1.0986 on the three current classes
    e_ood = -math.log(3.0)
    id_logits = torch.tensor([[50.0, 0.0, 2.0, 0.0, 0.0]])  # column 0 is an earlier class: masked
    ce = -math.log(math.exp(2.0) / (math.exp(2.0) + 2.0))
    e_id = -math.log(math.exp(2.0) + 2.0)

    def loss(t_id, t_ood, lam=1.0):
        return vor_loss(id_logits, y, ood, CURRENT, t_id, t_ood, lam).item()

    # ID energy below t_id and OOD energy above t_ood: both hinges are zero, only CE is left
    assert loss(e_id + 1.0, e_ood - 1.0) == pytest.approx(ce, abs=1e-5)
    # ID gap 0.5 (< 1): Huber is quadratic, 0.5 * 0.5²
    assert loss(e_id - 0.5, e_ood - 1.0) == pytest.approx(ce + 0.125, abs=1e-5)
    # OOD gap 3 (> 1): Huber is linear, 3 - 0.5; lambda scales only the regulariser
    assert loss(e_id + 1.0, e_ood + 3.0, lam=0.1) == pytest.approx(ce + 0.1 * 2.5, abs=1e-5)


def test_kth_nn_distance_counts_self_and_clamps_k():
    pts = torch.tensor([[0.0], [1.0], [3.0]])
    assert kth_nn_distance(pts, pts, 2).tolist() == [1.0, 1.0, 2.0]
    assert kth_nn_distance(pts, pts, 50).tolist() == [3.0, 2.0, 3.0]  # k clamped to 3


def test_outliers_count_and_lie_farther_than_boundary_and_id_points():
    x, _ = spherical_clusters()
    g = torch.Generator().manual_seed(1)
    out = synthesize_outliers(x, 40, k=10, select=20, sample_from=50, generator=g)
    assert out.shape == (40, x.shape[1])
    normed = F.normalize(x, dim=1)

    def mean_knn(points):  # in the normalised space where the selection happens
        return kth_nn_distance(F.normalize(points, dim=1), normed, 10).mean()

    boundary = x[boundary_indices(normed, 10, 20)]
    assert mean_knn(out) > mean_knn(boundary) > mean_knn(x)
    # at most as many outliers as candidates; k and select clamped to the few points available
    assert synthesize_outliers(x[:5], 10_000, k=50, select=50, sample_from=3, generator=g).shape == (15, 16)


def test_origin_anchor_option():
    x, _ = spherical_clusters()
    out = synthesize_outliers(x, 30, k=10, select=5, sample_from=40, cov=0.1, anchor="origin",
                              generator=torch.Generator().manual_seed(0))
    assert out.shape == (30, 16)
    # cov * N(0, I) around the origin: norms near 0.1 * sqrt(16), far below the data's sqrt(16)
    assert out.norm(dim=1).max() < 1.0 < x.norm(dim=1).min()
    with pytest.raises(ValueError, match="anchor"):
        synthesize_outliers(x, 3, anchor="centre")


def test_calibrate_thresholds_rule_and_ordering():
    # median -15 reproduces the reference pair (-15, -3)
    t_id, t_ood = calibrate_thresholds(torch.tensor([-20.0, -15.0, -10.0]))
    assert (t_id, t_ood) == pytest.approx((-15.0, -3.0))
    # near-zero or positive ID energies (untrained head): the 1-nat floor keeps t_ood above t_id
    for energies in ([-0.2, 0.0, 0.1], [1.0, 2.0, 3.0]):
        t_id, t_ood = calibrate_thresholds(torch.tensor(energies))
        assert t_ood >= t_id + 1.0


def test_config_validates():
    assert VORConfig().lam == 0.1 and VORConfig().t_id == -15.0 and VORConfig().epochs == 4
    with pytest.raises(ValueError):
        VORConfig(anchor="nowhere")
    with pytest.raises(ValueError):
        VORConfig(calibrate=False, t_id=-1.0, t_ood=-2.0)


SMALL = {"k": 10, "select": 10, "sample_from": 30, "num_per_class": 20, "epochs": 6, "lr": 1e-2, "lam": 1.0,
         "batch_size": 64}


def run_vor(seed: int = 0, **overrides):
    x, y = spherical_clusters()
    torch.manual_seed(seed)
    backbone = nn.Linear(16, 16)  # stands for the frozen backbone + prompt
    feats = backbone(x)
    feats_before = feats.detach().clone()
    head = nn.Linear(16, 5)
    stats = train_head_with_vor(head, feats, y, CURRENT, SEEN, VORConfig(**{**SMALL, **overrides}),
                                generator=torch.Generator().manual_seed(seed))
    return backbone, feats, feats_before, head, stats


def test_train_head_with_vor_changes_only_the_head():
    torch.manual_seed(0)
    head0 = nn.Linear(16, 5).state_dict()
    backbone, feats, feats_before, head, stats = run_vor()
    assert all(p.grad is None for p in backbone.parameters())
    assert torch.equal(feats, feats_before)
    assert not torch.equal(head.weight, head0["weight"])
    assert stats["n_outliers"] == 20 * len(CURRENT) and stats["t_ood"] > stats["t_id"]


def test_train_head_with_vor_lowers_outlier_energy_loss():
    x, y = spherical_clusters()
    torch.manual_seed(0)
    head = nn.Linear(16, 5)
    with torch.no_grad():
        _, t_ood = calibrate_thresholds(energy(head(x), CURRENT))
    outliers = synthesize_outliers(x, 60, k=10, select=10, sample_from=30,
                                   generator=torch.Generator().manual_seed(7))

    def ood_term():
        with torch.no_grad():
            gap = F.relu(t_ood - energy(head(outliers), CURRENT))
            return F.huber_loss(gap, torch.zeros_like(gap)).item()

    before = ood_term()
    stats = train_head_with_vor(head, x, y, CURRENT, SEEN, VORConfig(**SMALL),
                                generator=torch.Generator().manual_seed(0))
    assert ood_term() < 0.5 * before
    assert stats["energy_ood"] > stats["energy_id"]
    with torch.no_grad():  # the CE keeps the current task solved
        assert (head(x)[:, CURRENT].argmax(1) + CURRENT[0] == y).float().mean() > 0.95


def test_train_head_with_vor_is_deterministic_and_checks_classes():
    *_, head_a, stats_a = run_vor(seed=3)
    *_, head_b, stats_b = run_vor(seed=3)
    assert torch.equal(head_a.weight, head_b.weight) and stats_a == stats_b
    x, y = spherical_clusters()
    with pytest.raises(ValueError, match="seen_classes"):
        train_head_with_vor(nn.Linear(16, 5), x, y, CURRENT, [0, 1, 2], VORConfig(**SMALL))
    with pytest.raises(ValueError, match="labels"):
        train_head_with_vor(nn.Linear(16, 5), x, y, [2, 3], SEEN, VORConfig(**SMALL))


def test_lambda_zero_is_the_budget_matched_control_head_epochs_without_outliers():
    """OnePrompt + VOR trains the head for ``vor_epochs`` more than OnePrompt does; the control
    that separates the outliers' effect from those extra epochs is ``vor_lambda = 0``: the same
    epochs, batches and optimizer, the loss the cross-entropy alone. Checked against a plain
    head-only cross-entropy loop over the same batches (same generator draws)."""
    x, y = spherical_clusters()
    cfg = VORConfig(lam=0.0, epochs=3, batch_size=32, num_per_class=10)
    head = nn.Linear(x.shape[1], len(SEEN))
    control = nn.Linear(x.shape[1], len(SEEN))
    control.load_state_dict(head.state_dict())
    train_head_with_vor(head, x, y, CURRENT, SEEN, cfg, generator=torch.Generator().manual_seed(5))

    gen = torch.Generator().manual_seed(5)
    opt = torch.optim.Adam(control.parameters(), lr=cfg.lr)
    others = [c for c in range(len(SEEN)) if c not in CURRENT]
    for _ in range(cfg.epochs):
        outliers = synthesize_outliers(x, cfg.num_per_class * len(CURRENT), cfg.k, cfg.select, cfg.sample_from,
                                       cfg.cov, cfg.anchor, gen)  # drawn, as the phase draws them, and unused
        torch.randperm(len(outliers), generator=gen)
        for idx in torch.randperm(len(x), generator=gen).split(cfg.batch_size):
            logits = control(x[idx]).index_fill(1, torch.tensor(others), float("-inf"))
            opt.zero_grad()
            F.cross_entropy(logits, y[idx]).backward()
            opt.step()
    assert torch.allclose(head.weight, control.weight, atol=1e-6)
    assert torch.allclose(head.bias, control.bias, atol=1e-6)
