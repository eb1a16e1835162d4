"""tasks/streams.py: build_stream on the embedded digits and on .npz files the tests write."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import lifelong.tasks.streams
from lifelong.config import StreamConfig
from lifelong.tasks.data import DatasetError, load_digits
from lifelong.tasks.streams import build_stream


@pytest.fixture(autouse=True)
def _fresh_cache():
    """build_stream keeps the last streams in an lru_cache: every test starts (and ends) without."""
    lifelong.tasks.streams._build_stream_cached.cache_clear()
    yield
    lifelong.tasks.streams._build_stream_cached.cache_clear()


def fresh(cfg: StreamConfig, seed: int):
    lifelong.tasks.streams._build_stream_cached.cache_clear()
    return build_stream(cfg, seed)


def classes_of(y: torch.Tensor) -> list[int]:
    return sorted(torch.unique(y).tolist())


# --------------------------------------------------------------------------- split digits


def test_split_digits_default():
    s = build_stream(StreamConfig(), 0)
    assert s.name == "split_digits" and s.scenario == "class"
    assert s.n_experiences == 5
    assert s.classes_per_experience == [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9]]
    assert s.n_classes == 10
    assert s.input_shape == (1, 8, 8)
    assert len(s.train_stream) == 5 and len(s.test_stream) == 5
    n_train = n_test = 0
    for i, classes in enumerate(s.classes_per_experience):
        x, y, t = s.train_tensors(i)
        assert classes_of(y) == classes
        assert x.shape[1:] == (1, 8, 8)
        assert classes_of(t) == [0]  # class-incremental: no task labels
        xt, yt, _ = s.test_tensors(i)
        assert classes_of(yt) == classes
        n_train, n_test = n_train + len(y), n_test + len(yt)
    # the whole digits split, nothing lost or duplicated: 1347 train + 450 test
    assert (n_train, n_test) == (1347, 450)


def test_split_digits_shuffled_class_order():
    cfg = StreamConfig(class_order="shuffled")
    s = fresh(cfg, 3)
    flat = [c for exp in s.classes_per_experience for c in exp]
    assert sorted(flat) == list(range(10))  # a permutation of the classes
    assert s.classes_per_experience != [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9]]
    for i, classes in enumerate(s.classes_per_experience):
        assert len(classes) == 2
        assert classes_of(s.train_tensors(i)[1]) == classes
        assert classes_of(s.test_tensors(i)[1]) == classes
    # the same seed in a fresh build gives the same order; the order follows the seed
    assert fresh(cfg, 3).classes_per_experience == s.classes_per_experience
    others = {str(fresh(cfg, seed).classes_per_experience) for seed in (4, 5, 6)}
    assert others != {str(s.classes_per_experience)}


def test_split_digits_natural_order_ignores_seed():
    assert fresh(StreamConfig(), 1).classes_per_experience == fresh(StreamConfig(), 2).classes_per_experience


def test_split_digits_two_experiences():
    s = build_stream(StreamConfig(n_experiences=2), 0)
    assert s.classes_per_experience == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]
    assert classes_of(s.train_tensors(1)[1]) == [5, 6, 7, 8, 9]


def test_task_scenario_has_task_labels():
    s = build_stream(StreamConfig(name="split_digits", scenario="task"), 0)
    assert s.scenario == "task"
    for i in range(5):
        x, y, t = s.test_tensors(i)
        assert classes_of(t) == [i]
        assert classes_of(y) == s.classes_per_experience[i]
        assert classes_of(s.train_tensors(i)[2]) == [i]


def test_task_scenario_experiences_know_their_classes():
    s = build_stream(StreamConfig(name="split_digits", scenario="task"), 0)
    for i in range(5):
        assert list(s.train_stream[i].classes_in_this_experience) == s.classes_per_experience[i]
        assert list(s.test_stream[i].classes_in_this_experience) == s.classes_per_experience[i]


def test_task_scenario_multi_head_model_can_be_adapted():
    from avalanche.models.dynamic_modules import avalanche_model_adaptation
    from avalanche.models.utils import avalanche_forward

    from lifelong.config import ModelConfig
    from lifelong.tasks.models import build_model

    s = build_stream(StreamConfig(name="split_digits", scenario="task"), 0)
    model = build_model(ModelConfig(name="mlp", hidden=16), s.input_shape, s.n_classes, multi_head=True)
    for i in range(2):
        avalanche_model_adaptation(model, s.train_stream[i])
    x, y, t = s.test_tensors(1)
    assert avalanche_forward(model, x, t).shape == (len(x), 4)


# --------------------------------------------------------------------------- domain digits


def test_permuted_digits():
    s = build_stream(StreamConfig(name="permuted_digits"), 0)
    assert s.scenario == "domain"
    assert s.n_experiences == 5
    assert s.classes_per_experience == [list(range(10))] * 5
    original = load_digits(0.25, 0)
    x0, y0, _ = s.test_tensors(0)
    assert torch.equal(x0, original.x_test)  # experience 0 keeps the original pixels
    assert torch.equal(y0, original.y_test)
    x1, y1, _ = s.test_tensors(1)
    assert torch.equal(y1, original.y_test)
    assert not torch.equal(x1, x0)
    # ... but each image is a permutation of its own pixels
    assert torch.equal(x1.reshape(len(x1), -1).sort(dim=1).values, x0.reshape(len(x0), -1).sort(dim=1).values)
    # one fixed permutation per experience, the same for train and test
    tr0, tr1 = s.train_tensors(0)[0].reshape(-1, 64), s.train_tensors(1)[0].reshape(-1, 64)
    te0, te1 = x0.reshape(-1, 64), x1.reshape(-1, 64)
    _recover_permutation(torch.cat([tr0, te0]), torch.cat([tr1, te1]))  # asserts one fits both
    # and experiences 1 and 2 have different permutations
    assert not torch.equal(s.test_tensors(2)[0], x1)


def _recover_permutation(before: torch.Tensor, after: torch.Tensor) -> torch.Tensor:
    """A column permutation p with before[:, p] == after; asserts that one exists (columns that are
    identical in ``before``, such as always-blank pixels, may be matched in any order)."""
    perm = []
    for j in range(after.shape[1]):
        matches = (before == after[:, j : j + 1]).all(dim=0).nonzero().flatten()
        assert len(matches) >= 1
        perm.append(matches[0].item())
    p = torch.tensor(perm)
    assert torch.equal(before[:, p], after)
    return p


def test_rotated_digits():
    s = build_stream(StreamConfig(name="rotated_digits"), 0)
    assert s.scenario == "domain"
    assert s.classes_per_experience == [list(range(10))] * 5
    original = load_digits(0.25, 0)
    x0, y0, _ = s.test_tensors(0)
    assert torch.equal(x0, original.x_test)  # experience 0: rotation by 0
    assert torch.equal(s.train_tensors(0)[0], original.x_train)
    # the last experience is rotated by max_rotation = 90 degrees (4/4 of it), counter-clockwise;
    # on an 8×8 grid that is exactly torch.rot90
    x4, y4, _ = s.test_tensors(4)
    assert torch.equal(y4, original.y_test)
    assert torch.equal(x4, torch.rot90(original.x_test, 1, dims=(-2, -1)))
    assert not torch.equal(s.test_tensors(2)[0], x0)


# --------------------------------------------------------------------------- npz


def _write_npz(path: Path, n: int = 300, n_classes: int = 6, domains: int | None = None, seed: int = 0) -> Path:
    """n 8×8 float images, balanced classes; pixel [0, 0] holds the domain / 10 when domains given."""
    rng = np.random.default_rng(seed)
    x = rng.random((n, 8, 8), dtype=np.float32)
    y = np.arange(n) % n_classes
    arrays = {"x": x, "y": y}
    if domains is not None:
        d = (np.arange(n) // n_classes) % domains  # every domain has every class
        x[:, 0, 0] = d / 10
        arrays["domain"] = d
    np.savez(path, **arrays)
    return path


def test_npz_class_scenario(tmp_path):
    path = _write_npz(tmp_path / "six.npz")
    s = build_stream(StreamConfig(name="npz", path=path, n_experiences=3), 0)
    assert s.scenario == "class"
    assert s.n_classes == 6
    assert s.input_shape == (1, 8, 8)
    assert s.classes_per_experience == [[0, 1], [2, 3], [4, 5]]
    total = 0
    for i, classes in enumerate(s.classes_per_experience):
        assert classes_of(s.train_tensors(i)[1]) == classes
        assert classes_of(s.test_tensors(i)[1]) == classes
        total += len(s.test_tensors(i)[1])
    assert total == 75  # 25 % of 300


def test_npz_task_scenario(tmp_path):
    path = _write_npz(tmp_path / "six.npz")
    s = build_stream(StreamConfig(name="npz", path=path, scenario="task", n_experiences=2), 0)
    assert s.classes_per_experience == [[0, 1, 2], [3, 4, 5]]
    assert [classes_of(s.test_tensors(i)[2]) for i in range(2)] == [[0], [1]]


def test_npz_domain_given(tmp_path):
    path = _write_npz(tmp_path / "dom.npz", domains=3)
    cfg = StreamConfig(name="npz", path=path, scenario="domain", domain_shift="given", n_experiences=3)
    s = build_stream(cfg, 0)
    assert s.scenario == "domain"
    assert s.n_experiences == 3
    assert s.classes_per_experience == [list(range(6))] * 3
    total = 0
    for i in range(3):
        for x, y, _ in (s.train_tensors(i), s.test_tensors(i)):
            # every sample of experience i comes from domain i (pixel [0, 0] = domain / 10)
            assert torch.allclose(x[:, 0, 0, 0], torch.full((len(x),), i / 10))
        total += len(s.test_tensors(i)[1])
    assert total == 75


def test_npz_domain_given_wrong_number_of_domains(tmp_path):
    path = _write_npz(tmp_path / "dom.npz", domains=3)
    cfg = StreamConfig(name="npz", path=path, scenario="domain", domain_shift="given", n_experiences=4)
    with pytest.raises(DatasetError, match=r"stream.n_experiences: the npz file has 3 domains \[0, 1, 2\], not 4"):
        build_stream(cfg, 0)


def test_npz_domain_given_without_domain_array(tmp_path):
    path = _write_npz(tmp_path / "plain.npz")
    cfg = StreamConfig(name="npz", path=path, scenario="domain", domain_shift="given", n_experiences=3)
    with pytest.raises(DatasetError, match="needs a `domain` array"):
        build_stream(cfg, 0)


def test_npz_domain_permute(tmp_path):
    path = _write_npz(tmp_path / "six.npz")
    cfg = StreamConfig(name="npz", path=path, scenario="domain", domain_shift="permute", n_experiences=2)
    s = build_stream(cfg, 0)
    x0, x1 = s.test_tensors(0)[0], s.test_tensors(1)[0]
    assert not torch.equal(x0, x1)
    assert torch.equal(x0.reshape(len(x0), -1).sort(1).values, x1.reshape(len(x1), -1).sort(1).values)


def test_npz_impossible_class_split(tmp_path):
    path = _write_npz(tmp_path / "six.npz")
    with pytest.raises(ValueError, match="n_experiences") as info:
        build_stream(StreamConfig(name="npz", path=path, n_experiences=4), 0)
    assert "4 experiences cannot split 6 classes" in str(info.value)
    assert "[1, 2, 3, 6]" in str(info.value)  # the counts that would work


def test_npz_missing_file_fails_at_build(tmp_path):
    cfg = StreamConfig(name="npz", path=tmp_path / "absent.npz", n_experiences=3)
    with pytest.raises(DatasetError, match="file not found"):
        build_stream(cfg, 0)


# --------------------------------------------------------------------------- determinism


@pytest.mark.parametrize("cfg", [
    StreamConfig(class_order="shuffled"),
    StreamConfig(name="permuted_digits", n_experiences=3),
], ids=["split_shuffled", "permuted"])
def test_same_config_same_stream(cfg):
    a = fresh(cfg, 11)
    b = fresh(cfg, 11)
    assert a is not b  # really built twice
    assert a.classes_per_experience == b.classes_per_experience
    for i in range(a.n_experiences):
        for ta, tb in zip(a.test_tensors(i), b.test_tensors(i)):
            assert torch.equal(ta, tb)
        for ta, tb in zip(a.train_tensors(i), b.train_tensors(i)):
            assert torch.equal(ta, tb)


def test_npz_same_config_same_stream(tmp_path):
    cfg = StreamConfig(name="npz", path=_write_npz(tmp_path / "six.npz"), n_experiences=3, class_order="shuffled")
    a, b = fresh(cfg, 5), fresh(cfg, 5)
    assert a is not b
    for i in range(3):
        for ta, tb in zip(a.test_tensors(i), b.test_tensors(i)):
            assert torch.equal(ta, tb)


def test_permuted_other_seed_other_permutation():
    cfg = StreamConfig(name="permuted_digits", n_experiences=2)
    a, b = fresh(cfg, 0), fresh(cfg, 1)
    # seeds 0 and 1 split the digits differently too, so compare the permutation of one image set
    xa = load_digits(0.25, 0).x_test.reshape(-1, 64)
    pa = _recover_permutation(xa, a.test_tensors(1)[0].reshape(-1, 64))
    xb = load_digits(0.25, 1).x_test.reshape(-1, 64)
    pb = _recover_permutation(xb, b.test_tensors(1)[0].reshape(-1, 64))
    assert not torch.equal(xa[:, pa], xa[:, pb])


def test_a_validation_split_replaces_the_test_split_and_comes_from_training_data():
    from lifelong.tasks.data import load_digits

    full = build_stream(StreamConfig(name="split_digits"), 0)
    val = build_stream(StreamConfig(name="split_digits", validation_fraction=0.2), 0)
    original = load_digits(0.25, 0)
    rows = lambda x: {tuple(r) for r in x.flatten(1).tolist()}
    train_rows, test_rows = rows(original.x_train), rows(original.x_test)
    val_x = torch.cat([val.test_tensors(i)[0] for i in range(val.n_experiences)])
    fit_x = torch.cat([val.train_tensors(i)[0] for i in range(val.n_experiences)])
    assert rows(val_x) <= train_rows and not rows(val_x) & test_rows  # never the test split
    assert not rows(val_x) & rows(fit_x)  # carved out of training, not shared with it
    assert len(val_x) == pytest.approx(0.2 * len(original.x_train), abs=2)
    assert len(fit_x) + len(val_x) == sum(len(full.train_tensors(i)[0]) for i in range(full.n_experiences))
    # every experience's classes are in its validation share (stratified)
    assert all(set(val.test_tensors(i)[1].tolist()) == set(c) for i, c in enumerate(val.classes_per_experience))


def test_a_validation_split_too_small_for_a_class_is_refused():
    from lifelong.tasks.data import DatasetError

    with pytest.raises(DatasetError, match=r"stream.validation_fraction: 0.001 of the training split leaves class"):
        build_stream(StreamConfig(name="split_digits", validation_fraction=0.001), 0)
