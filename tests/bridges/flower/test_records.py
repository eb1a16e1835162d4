"""The fast ArrayRecord codec against Flower's own: the same bytes out, the same arrays back."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, MetricRecord, RecordDict
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from lifelong.bridges.flower.records import (
    from_numpy,
    from_state_dict,
    to_numpy,
    to_state_dict,
    weighted_mean,
)

DTYPES = st.sampled_from([np.float16, np.float32, np.float64, np.int8, np.int32, np.int64, np.uint8,
                          np.bool_, np.complex64, np.dtype(">f4"), np.dtype(">i8")])
ARRAYS = hnp.arrays(DTYPES, hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=5))
LAYOUTS = st.sampled_from(["C", "F", "strided"])


def _layout(x: np.ndarray, layout: str) -> np.ndarray:
    if layout == "F":
        return np.asfortranarray(x)
    if layout == "strided" and x.ndim:
        return np.repeat(x, 2, axis=0)[::2]  # same values, a view that is not contiguous
    return x


def _same(a: np.ndarray, b: np.ndarray) -> None:
    assert a.dtype == b.dtype and a.shape == b.shape
    assert np.array_equal(a, b, equal_nan=a.dtype.kind in "fc")


@settings(max_examples=300, deadline=None)
@given(ARRAYS, LAYOUTS)
def test_encoding_is_flowers_byte_for_byte(x, layout):
    x = _layout(x, layout)
    ours, theirs = from_numpy(x), Array(x)
    assert (ours.dtype, ours.shape, ours.stype, ours.data) == (theirs.dtype, theirs.shape, theirs.stype, theirs.data)


@settings(max_examples=300, deadline=None)
@given(ARRAYS, LAYOUTS)
def test_decoding_gives_what_numpy_load_gives(x, layout):
    x = _layout(x, layout)
    array = Array(x)  # Flower's own bytes, Fortran order included
    decoded = to_numpy(array)
    _same(decoded, array.numpy())
    _same(decoded, x)
    assert not decoded.flags.writeable  # a view of the message's bytes: never written through


def test_header_cache_tells_shapes_and_dtypes_apart():
    a, b = np.arange(6, dtype=np.float32).reshape(2, 3), np.arange(6, dtype=np.float32).reshape(3, 2)
    c = np.arange(6, dtype=np.int32).reshape(2, 3)
    for x in (a, b, c, a, b, c):
        assert from_numpy(x).data == Array(x).data
        _same(to_numpy(from_numpy(x)), x)


def test_payload_that_does_not_match_its_header_gets_numpys_error():
    good = Array(np.arange(4, dtype=np.float64))
    truncated = Array(dtype=good.dtype, shape=good.shape, stype=good.stype, data=good.data[:-8])
    with pytest.raises(ValueError):
        to_numpy(truncated)


def test_state_dict_round_trip_gives_writable_tensors_of_their_own():
    state = {"w": torch.randn(3, 4), "b": torch.zeros(4, dtype=torch.int64), "m": torch.tensor([True, False])}
    record = from_state_dict(state)
    assert all(record[k].data == ArrayRecord(state)[k].data for k in state)
    back = to_state_dict(record)
    assert list(back) == list(state)
    for k, tensor in state.items():
        assert torch.equal(back[k], tensor) and back[k].dtype == tensor.dtype
    back["w"] += 1  # writable, and the record keeps its bytes
    assert torch.equal(to_state_dict(record)["w"], state["w"])


def test_weighted_mean_is_flowers_fedavg_mean_bit_for_bit():
    rng = np.random.default_rng(0)
    shapes = {"conv": (4, 3, 3, 3), "bias": (4,), "scalar": (), "count": (2,)}
    records, contents, sizes = [], [], [7, 13, 2]
    for n in sizes:
        arrays = {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items() if k != "count"}
        arrays["count"] = rng.integers(0, 9, 2)
        record = ArrayRecord({k: Array(v) for k, v in arrays.items()})
        records.append(record)
        contents.append(RecordDict({"arrays": record, "metrics": MetricRecord({"num-examples": n})}))
    ours, theirs = weighted_mean(records, sizes), aggregate_arrayrecords(contents, "num-examples")
    assert list(ours) == list(theirs)
    for k in theirs:
        assert ours[k].data == theirs[k].data, k
