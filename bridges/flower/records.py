"""Flower ``ArrayRecord`` <-> PyTorch state dicts, in Flower's own format, at a fraction of its cost.

Flower 1.42 keeps every ``Array`` as the bytes of a ``.npy`` file (``np.save`` / ``np.load``).
For a model's few small tensors most of that cost is per array, not per byte: ``np.load`` parses
each header with ``ast.literal_eval`` and copies the payload through a ``BytesIO``, and
``np.save`` formats each header anew. A federated round crosses that format four times per client
(the global model to the client and its reply back, each encoded and decoded), which made up
a large part of what a simulated round costs beyond its training (``python -m bench federated``).

Written here because Flower has no faster path. The format is not ours and does not change:

* :func:`from_numpy` writes the very bytes ``Array(ndarray)`` writes — the ``.npy`` header
  ``np.save`` made for that dtype and shape (kept per dtype and shape), then the raw data;
* :func:`to_numpy` reads any ``.npy`` payload: the header parsed by numpy's own reader (once per
  distinct header), the data read in place with ``np.frombuffer``.

Anything off the fast path (a non-contiguous array, a payload whose size does not match its
header, a non-numpy ``stype``) goes through Flower's own methods, with their errors.
"""

from __future__ import annotations

import io
from collections import OrderedDict
from collections.abc import Mapping
from functools import lru_cache

import numpy as np
import torch
from flwr.app import Array, ArrayRecord
from flwr.common.constant import SType

_MAGIC = b"\x93NUMPY"
#: ``.npy`` headers that ``np.save`` writes, per (dtype, shape): they depend on nothing else.
#: A model has a few dozen; a replay memory's arrays pass through many sizes, hence the bound.
_HEADERS: dict[tuple[np.dtype, tuple[int, ...]], bytes] = {}
_MAX_HEADERS = 1024


def from_numpy(x: np.ndarray) -> Array:
    """``Array(x)``, byte for byte."""
    if not x.flags.c_contiguous or x.dtype.hasobject:
        return Array(x)  # Fortran order or a copy to make: np.save decides, as Flower does
    key = (x.dtype, x.shape)
    header = _HEADERS.get(key)
    if header is None:
        if len(_HEADERS) >= _MAX_HEADERS:
            _HEADERS.clear()
        buffer = io.BytesIO()
        np.save(buffer, x, allow_pickle=False)
        saved = buffer.getvalue()
        header = _HEADERS[key] = saved[: len(saved) - x.nbytes]
    # (header + the array's own buffer: one copy, where x.tobytes() would make a second)
    return Array(dtype=str(x.dtype), shape=tuple(x.shape), stype=SType.NUMPY, data=header + memoryview(x))


def to_numpy(array: Array) -> np.ndarray:
    """``array.numpy()``, as a read-only view of the array's bytes (no copy)."""
    data = array.data
    if array.stype != SType.NUMPY or data[:6] != _MAGIC:
        return array.numpy()
    major = data[6]
    size_bytes = 2 if major == 1 else 4
    start = 8 + size_bytes + int.from_bytes(data[8:8 + size_bytes], "little")
    shape, fortran_order, dtype = _header(bytes(data[:start]))
    count = int(np.prod(shape, dtype=np.int64))
    if dtype.hasobject or len(data) - start != count * dtype.itemsize:
        return array.numpy()  # (np.load's own error for a truncated or foreign payload)
    flat = np.frombuffer(data, dtype=dtype, count=count, offset=start)
    return flat.reshape(shape[::-1]).T if fortran_order else flat.reshape(shape)


@lru_cache(maxsize=1024)
def _header(header: bytes) -> tuple[tuple[int, ...], bool, np.dtype]:
    stream = io.BytesIO(header)
    major, _ = np.lib.format.read_magic(stream)
    read = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
    return read(stream)


def to_state_dict(record: ArrayRecord) -> OrderedDict[str, torch.Tensor]:
    """``record.to_torch_state_dict()``: tensors of their own (writable, the record untouched)."""
    return OrderedDict((k, torch.from_numpy(to_numpy(a).copy())) for k, a in record.items())


def from_state_dict(state: Mapping[str, torch.Tensor]) -> ArrayRecord:
    """``ArrayRecord(state)`` for a PyTorch state dict, byte for byte."""
    return ArrayRecord({k: from_numpy(v.detach().cpu().numpy()) for k, v in state.items()})


def weighted_mean(records: list[ArrayRecord], weights: list[float]) -> ArrayRecord:
    """Flower's FedAvg mean (``aggregate_arrayrecords``), value for value: each record scaled by
    its share of the total weight and summed in the given order, in numpy's arithmetic."""
    total = sum(weights)
    mean: dict[str, np.ndarray] = {}
    for record, weight in zip(records, weights, strict=True):
        factor = weight / total
        for key, array in record.items():
            if key in mean:
                mean[key] += to_numpy(array) * factor
            else:
                mean[key] = to_numpy(array) * factor
    return ArrayRecord({k: from_numpy(np.asarray(v)) for k, v in mean.items()})
