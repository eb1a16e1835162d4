"""privacy/clipping.py: clipping modes by hand and as properties, the reference code's rules, noise."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lifelong.privacy.clipping import (
    adaptive_update_noise_multiplier,
    add_gaussian_noise,
    clip_update,
    layer_bounds,
    noisy_unclipped_fraction,
    private_mean,
    update_clip_bound,
)

TOL = 1e-5


def t(*values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def norm(x: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(x))


def total(update) -> float:
    return math.sqrt(sum(norm(x) ** 2 for x in update))


# --------------------------------------------------------------------------- the reference code, ported
# A literal NumPy port of apple-aiml-research/ml-pfl4asr pfl4asr/pfl4asr/utils/pfunctions.py
# (clip_grads, clip_layer_grads, clip_layer_grads_params), to compare against.


def ref_clip_grads(leaves, max_norm):
    l2 = math.sqrt(sum(float(np.vdot(x, x)) for x in leaves))
    return [x if l2 < max_norm else x * (max_norm / (l2 + 1e-6)) for x in leaves]


def ref_clip_layer_grads(leaves, max_norm):
    l2 = math.sqrt(sum(float(np.vdot(x, x)) for x in leaves))
    n = len(leaves)
    return [x if l2 < max_norm else x / (math.sqrt(float(np.vdot(x, x))) + 1e-10) * (max_norm / n**0.5)
            for x in leaves]


def ref_clip_layer_grads_params(leaves, max_norm):
    l2 = math.sqrt(sum(float(np.vdot(x, x)) for x in leaves))
    n_params = sum(x.size for x in leaves)
    return [x if l2 < max_norm
            else x / (math.sqrt(float(np.vdot(x, x))) + 1e-10) * (max_norm * x.size**0.5 / n_params**0.5)
            for x in leaves]


# --------------------------------------------------------------------------- hand-computed cases


def test_flat_scales_the_whole_update_to_the_bound():
    update = [t(3.0, 4.0), t(0.0)]
    out = clip_update(update, 1.0, "flat")
    assert torch.allclose(out.update[0], t(0.6, 0.8), atol=1e-6)
    assert torch.equal(out.update[1], t(0.0))
    assert out.total_norm == pytest.approx(5.0)
    assert out.layer_norms.tolist() == pytest.approx([5.0, 0.0])
    assert total(out.update) <= 1.0
    assert out.layer_bounds is None and not out.within_bound


def test_updates_under_the_bound_are_unchanged_and_inputs_untouched():
    update = [t(3.0, 4.0), t(0.5)]
    before = [x.clone() for x in update]
    for mode in ("flat", "per_layer", "per_layer_normalize", "per_layer_dim"):
        out = clip_update(update, 100.0, mode)
        assert all(torch.equal(a, b) for a, b in zip(out.update, before)), mode
        assert all(a is not b for a, b in zip(out.update, update)), mode
        assert out.within_bound
    # clipping does not write into the caller's tensors
    clip_update(update, 0.1, "per_layer")
    assert all(torch.equal(a, b) for a, b in zip(update, before))


def test_per_layer_uniform_clips_each_layer_to_c_over_sqrt_l():
    update = [t(3.0, 4.0), t(0.0, 0.5)]  # norms 5 and 0.5
    out = clip_update(update, 2.0, "per_layer")  # C_l = 2/sqrt(2) = sqrt(2)
    s = math.sqrt(2.0)
    assert out.layer_bounds.tolist() == pytest.approx([s, s])
    assert torch.allclose(out.update[0], t(3.0, 4.0) * s / 5, atol=1e-6)
    assert torch.equal(out.update[1], t(0.0, 0.5))  # under its own bound: unchanged
    assert norm(out.update[0]) == pytest.approx(s, rel=1e-6)
    assert total(out.update) == pytest.approx(math.sqrt(2 + 0.25), rel=1e-6)


def test_per_layer_size_gives_c_l_squared_proportional_to_layer_size():
    update = [t(2.0, 2.0, 2.0, 2.0), t(0.5)]  # sizes 4 and 1, norms 4 and 0.5
    out = clip_update(update, math.sqrt(5.0), "per_layer", allocation="size")  # C_l = 2 and 1
    assert out.layer_bounds.tolist() == pytest.approx([2.0, 1.0])
    assert torch.allclose(out.update[0], t(1.0, 1.0, 1.0, 1.0), atol=1e-6)
    assert torch.equal(out.update[1], t(0.5))


def test_per_layer_clips_a_layer_over_its_bound_even_when_the_total_is_under_c():
    update = [t(6.0, 0.0), t(0.0, 1.0)]  # total 6.08 < 7, but layer 0 over C_l = 4.95
    c_l = 7.0 / math.sqrt(2)
    assert norm(clip_update(update, 7.0, "per_layer").update[0]) == pytest.approx(c_l, rel=1e-6)
    # the reference code's rule leaves it alone: only the total is tested
    kept = clip_update(update, 7.0, "per_layer_normalize").update
    assert torch.equal(kept[0], update[0]) and torch.equal(kept[1], update[1])


def test_per_layer_normalize_rescales_every_layer_to_its_bound_including_small_ones():
    update = [t(3.0, 4.0), t(0.0, 0.5), t(0.0, 0.0)]  # total 5.02 >= C = 3
    out = clip_update(update, 3.0, "per_layer_normalize")
    c_l = 3.0 / math.sqrt(3)
    assert norm(out.update[0]) == pytest.approx(c_l, rel=1e-6)
    assert norm(out.update[1]) == pytest.approx(c_l, rel=1e-6)  # scaled *up* from 0.5
    assert torch.equal(out.update[2], t(0.0, 0.0))  # a zero layer stays zero
    assert torch.allclose(out.update[1], t(0.0, c_l), atol=1e-6)
    assert total(out.update) <= 3.0


def test_per_layer_dim_is_the_reference_per_dimension_rule():
    update = [t(2.0, 2.0, 2.0, 2.0), t(0.5)]
    out = clip_update(update, 1.0, "per_layer_dim")
    assert out.layer_bounds.tolist() == pytest.approx([math.sqrt(4 / 5), math.sqrt(1 / 5)])
    assert norm(out.update[0]) == pytest.approx(math.sqrt(4 / 5), rel=1e-6)
    assert norm(out.update[1]) == pytest.approx(math.sqrt(1 / 5), rel=1e-6)
    same = clip_update(update, 1.0, "per_layer_normalize", allocation="size")
    assert all(torch.equal(a, b) for a, b in zip(out.update, same.update))
    with pytest.raises(ValueError, match="per_layer_dim"):
        clip_update(update, 1.0, "per_layer_dim", allocation="uniform")


def test_explicit_layer_bounds_must_not_exceed_the_total_bound():
    update = [t(3.0, 4.0), t(1.0)]
    out = clip_update(update, 5.0, "per_layer", layer_bounds=[3.0, 4.0])
    assert norm(out.update[0]) == pytest.approx(3.0, rel=1e-6)
    with pytest.raises(ValueError, match="would not cover"):
        clip_update(update, 1.0, "per_layer", layer_bounds=[1.0, 1.0])
    with pytest.raises(ValueError, match="entries"):
        clip_update(update, 1.0, "per_layer", layer_bounds=[1.0])
    with pytest.raises(ValueError):
        clip_update(update, 0.0, "flat")
    with pytest.raises(ValueError):
        clip_update(update, 1.0, "bogus")


# --------------------------------------------------------------------------- properties over random shapes

shapes = st.lists(st.integers(1, 4), min_size=1, max_size=3).map(tuple)


@st.composite
def updates(draw):
    n_layers = draw(st.integers(1, 6))
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_layers):
        shape = draw(shapes)
        scale = draw(st.sampled_from([0.0, 1e-3, 0.1, 1.0, 10.0, 1e3]))
        out.append(torch.randn(shape, generator=gen, dtype=torch.float64) * scale)
    return out


bounds = st.floats(0.01, 100.0)


def _parallel(a: torch.Tensor, b: torch.Tensor) -> bool:
    """b is a non-negative multiple of a."""
    na, nb = norm(a), norm(b)
    if na == 0 or nb == 0:
        return nb == 0
    return float((a.flatten() @ b.flatten()) / (na * nb)) > 1 - 1e-9


@settings(max_examples=150, deadline=None)
@given(updates(), bounds)
def test_flat_properties(update, c):
    out = clip_update(update, c, "flat")
    before = total(update)
    assert out.total_norm == pytest.approx(before, rel=1e-9, abs=1e-12)
    assert total(out.update) <= c * (1 + TOL)
    if before < c:
        assert all(torch.equal(a, b) for a, b in zip(out.update, update))
    else:
        assert total(out.update) == pytest.approx(c, rel=2e-4)  # c * N / (N + 1e-6), N >= 0.01
        # direction kept: one common positive scale for all layers
        scale = c / (before + 1e-6)
        assert all(torch.allclose(b, a * scale, rtol=1e-9, atol=1e-12) for a, b in zip(update, out.update))
    ref = ref_clip_grads([x.numpy() for x in update], c)
    assert all(np.allclose(r, o.numpy(), rtol=1e-9, atol=1e-12) for r, o in zip(ref, out.update))


@settings(max_examples=150, deadline=None)
@given(updates(), bounds, st.sampled_from(["uniform", "size"]))
def test_per_layer_properties(update, c, allocation):
    out = clip_update(update, c, "per_layer", allocation=allocation)
    c_l = out.layer_bounds
    assert float((c_l**2).sum()) == pytest.approx(c**2, rel=1e-9)  # sum C_l^2 = C^2
    assert out.layer_norms.tolist() == pytest.approx([norm(x) for x in update], rel=1e-9, abs=1e-12)
    for x, y, b in zip(update, out.update, c_l.tolist()):
        assert norm(y) <= b * (1 + TOL)
        if norm(x) + 1e-6 <= b:
            assert torch.equal(x, y)
        assert _parallel(x, y)
    assert total(out.update) <= c * (1 + TOL)


@settings(max_examples=150, deadline=None)
@given(updates(), bounds, st.sampled_from(["per_layer_normalize", "per_layer_dim"]))
def test_reference_per_layer_normalisation_properties(update, c, mode):
    out = clip_update(update, c, mode)
    before = total(update)
    assert total(out.update) <= c * (1 + TOL)
    if before < c:
        assert all(torch.equal(a, b) for a, b in zip(out.update, update))
    else:
        for x, y, b in zip(update, out.update, out.layer_bounds.tolist()):
            if norm(x) > 1e-6:  # a non-negligible layer lands on its bound, whatever its norm was
                assert norm(y) == pytest.approx(b, rel=1e-4)
            assert _parallel(x, y)
    ref_fn = ref_clip_layer_grads if mode == "per_layer_normalize" else ref_clip_layer_grads_params
    ref = ref_fn([x.numpy() for x in update], c)
    assert all(np.allclose(r, o.numpy(), rtol=1e-9, atol=1e-12) for r, o in zip(ref, out.update))


def test_layer_bounds_helper_and_float32_on_the_tensors_device():
    update = [torch.ones(3, 3), torch.ones(3)]
    assert layer_bounds(update, 1.0, "size").tolist() == pytest.approx([math.sqrt(0.75), math.sqrt(0.25)])
    out = clip_update(update, 1.0, "per_layer")
    assert out.update[0].dtype == torch.float32 and out.update[0].shape == (3, 3)


# --------------------------------------------------------------------------- noise


def test_noise_standard_deviation_is_z_times_c():
    z, c, n = 1.3, 0.7, 20_000
    gen = torch.Generator().manual_seed(0)
    noised = add_gaussian_noise([torch.zeros(n), torch.zeros(100, 100)], z, c, gen)
    for x in noised:
        assert float(x.std()) == pytest.approx(z * c, rel=0.03)
        assert abs(float(x.mean())) < 4 * z * c / math.sqrt(x.numel())
    # independent across tensors, reproducible from the generator
    assert abs(float(torch.corrcoef(torch.stack([noised[0][:10_000], noised[1].flatten()]))[0, 1])) < 0.05
    again = add_gaussian_noise([torch.zeros(n), torch.zeros(100, 100)], z, c, torch.Generator().manual_seed(0))
    assert torch.equal(again[0], noised[0])
    # z = 0: no noise
    assert torch.equal(add_gaussian_noise([torch.ones(3)], 0.0, c)[0], torch.ones(3))
    with pytest.raises(ValueError):
        add_gaussian_noise([torch.ones(3)], -1.0, c)


def test_private_mean_noise_on_the_average_is_z_c_over_cohort():
    z, c, cohort, n = 2.0, 0.5, 4, 20_000
    clipped = [[torch.full((n,), float(i))] for i in range(cohort)]  # mean 1.5
    gen = torch.Generator().manual_seed(1)
    mean = private_mean(clipped, z, c, denominator=cohort, generator=gen)[0]
    assert float(mean.mean()) == pytest.approx(1.5, abs=4 * z * c / cohort / math.sqrt(n))
    assert float(mean.std()) == pytest.approx(z * c / cohort, rel=0.03)


# --------------------------------------------------------------------------- adaptive clipping


def test_geometric_update_moves_the_bound_toward_the_target_quantile():
    assert update_clip_bound(1.0, 0.5, 0.5) == 1.0
    assert update_clip_bound(1.0, 0.9, 0.5, 0.2) == pytest.approx(math.exp(-0.2 * 0.4))  # too loose: shrink
    assert update_clip_bound(2.0, 0.1, 0.5, 0.2) == pytest.approx(2.0 * math.exp(0.2 * 0.4))  # too tight: grow
    # noiseless count: exact fraction of updates within the bound
    assert noisy_unclipped_fraction([True, True, False, True], 4, 0.0) == pytest.approx(0.75)
    # Andrew et al. Theorem 1: update and count noise together cost the budget of z
    z, sigma_b = 1.0, 5.0
    z_delta = adaptive_update_noise_multiplier(z, sigma_b)
    assert (z_delta**-2 + (2 * sigma_b) ** -2) ** -0.5 == pytest.approx(z)
    assert z_delta > z
    with pytest.raises(ValueError, match="too small"):
        adaptive_update_noise_multiplier(1.0, 0.4)


def test_adaptive_clipping_tracks_the_median_norm():
    gen = torch.Generator().manual_seed(3)
    cohort, c = 100, 0.01
    for _ in range(300):
        norms = torch.exp(torch.randn(cohort, generator=gen))  # log-normal, median 1
        b = noisy_unclipped_fraction((norms <= c).tolist(), cohort, cohort / 20, gen)
        c = update_clip_bound(c, b, target_quantile=0.5, learning_rate=0.2)
    assert c == pytest.approx(1.0, rel=0.25)
