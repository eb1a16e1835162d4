"""tasks/distorted_digits.py: the generated 28×28 grey and 32×32 colour digits."""

import numpy as np
import pytest
import torch

from lifelong.config import StreamConfig
from lifelong.tasks.distorted_digits import DRAWINGS_PER_SCAN, _drawings, load_distorted_digits
from lifelong.tasks.streams import build_stream


@pytest.mark.parametrize(("colour", "shape"), [(False, (1, 28, 28)), (True, (3, 32, 32))])
def test_every_scan_is_drawn_several_times_in_range(colour, shape):
    x, y, source = _drawings(colour)
    assert x.shape == (1797 * DRAWINGS_PER_SCAN, *shape) and x.dtype == torch.float32
    assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0
    assert torch.equal(torch.bincount(source), torch.full((1797,), DRAWINGS_PER_SCAN))
    # drawings of one scan share its label, and differ from one another (distortions are per drawing)
    first = x[source == 0]
    assert len(set(y[source == 0].tolist())) == 1
    assert float((first[0] - first[1]).abs().mean()) > 0.02


def test_the_data_set_is_fixed_whatever_the_run_seed():
    a, b = load_distorted_digits(0.25, 0, False), load_distorted_digits(0.25, 0, False)
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_test, b.y_test)
    c = load_distorted_digits(0.25, 1, False)  # another seed: another split of the same images
    assert not torch.equal(a.y_train, c.y_train)
    pool = lambda arrays: sorted(map(tuple, torch.cat([arrays.x_train, arrays.x_test]).flatten(1)[:, ::97].tolist()))  # noqa: E731
    assert pool(a) == pool(c)


def test_train_and_test_never_share_a_source_scan():
    x, _, source = _drawings(False)
    a = load_distorted_digits(0.25, 3, False)
    index = {tuple(row[::41].tolist()): int(s) for row, s in zip(x.flatten(1), source)}
    train = {index[tuple(r[::41].tolist())] for r in a.x_train.flatten(1)}
    test = {index[tuple(r[::41].tolist())] for r in a.x_test.flatten(1)}
    assert train and test and not train & test
    assert len(a.x_test) / (len(a.x_train) + len(a.x_test)) == pytest.approx(0.25, abs=0.01)
    assert np.bincount(a.y_test.numpy()).min() > 150  # stratified: every class in the test split


def test_named_streams_build_from_the_generated_digits():
    s = build_stream(StreamConfig(name="split_digits28"), 0)
    assert s.input_shape == (1, 28, 28) and s.n_experiences == 5 and s.scenario == "class"
    c = build_stream(StreamConfig(name="split_digits32c", n_experiences=2), 0)
    assert c.input_shape == (3, 32, 32) and c.classes_per_experience == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]
    r = build_stream(StreamConfig(name="rotated_digits28", n_experiences=3), 0)
    assert r.scenario == "domain" and r.n_experiences == 3
