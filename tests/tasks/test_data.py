"""tasks/data.py loaders, on the embedded digits and on files the tests write (nothing downloaded)."""

from __future__ import annotations

import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from lifelong.tasks.data import DatasetError, load_cifar, load_digits, load_mnist, load_npz

# --------------------------------------------------------------------------- digits


def test_load_digits_shapes_and_values():
    a = load_digits(0.25, 0)
    # 1,797 images; sklearn's test size is ceil(0.25 * 1797) = ceil(449.25) = 450, train 1347
    assert a.x_train.shape == (1347, 1, 8, 8)
    assert a.x_test.shape == (450, 1, 8, 8)
    assert a.y_train.shape == (1347,) and a.y_test.shape == (450,)
    assert a.x_train.dtype == torch.float32 and a.y_train.dtype == torch.int64
    for x in (a.x_train, a.x_test):
        assert x.min() >= 0.0 and x.max() <= 1.0
    assert a.x_train.max() == 1.0  # pixel 16 / 16
    assert a.n_classes == 10
    assert a.input_shape == (1, 8, 8)
    assert a.d_train is None and a.d_test is None


def test_load_digits_split_is_stratified():
    a = load_digits(0.25, 0)
    total = torch.bincount(torch.cat([a.y_train, a.y_test]), minlength=10)
    test = torch.bincount(a.y_test, minlength=10)
    # each class keeps its share in the test split, to within one sample
    assert ((test.float() - 0.25 * total.float()).abs() <= 1.0).all()


def test_load_digits_same_seed_same_split():
    a, b = load_digits(0.25, 7), load_digits(0.25, 7)
    for name in ("x_train", "y_train", "x_test", "y_test"):
        assert torch.equal(getattr(a, name), getattr(b, name))


def test_load_digits_other_seed_other_split():
    a, b = load_digits(0.25, 0), load_digits(0.25, 1)
    assert a.x_test.shape == b.x_test.shape
    assert not torch.equal(a.x_test, b.x_test)
    assert not torch.equal(a.y_test, b.y_test)


# --------------------------------------------------------------------------- npz


def _save(path: Path, **arrays) -> Path:
    np.savez(path, **arrays)
    return path


def test_load_npz_flat_features_split(tmp_path):
    # 100 rows × 5 float features, 4 classes of 25; row r holds r in its first column
    x = np.random.default_rng(0).random((100, 5), dtype=np.float32)
    x[:, 0] = np.arange(100)
    y = np.arange(100) % 4
    a = load_npz(_save(tmp_path / "d.npz", x=x, y=y), 0.2, 0)
    assert a.x_train.shape == (80, 5) and a.x_test.shape == (20, 5)
    assert a.input_shape == (5,)
    assert a.n_classes == 4
    # float features are not rescaled, and rows stay with their labels
    rows = torch.cat([a.x_train, a.x_test])
    labels = torch.cat([a.y_train, a.y_test])
    order = rows[:, 0].argsort()
    assert torch.equal(rows[order], torch.from_numpy(x))
    assert torch.equal(labels[order], torch.from_numpy(y))
    # stratified: 20 test rows of 4 balanced classes -> 5 each
    assert torch.bincount(a.y_test).tolist() == [5, 5, 5, 5]


def test_load_npz_grey_uint8_images_scaled_with_channel(tmp_path):
    rng = np.random.default_rng(1)
    x = rng.integers(0, 256, (12, 6, 7), dtype=np.uint8)
    x[0, 0, 0], x[0, 0, 1], x[0, 0, 2] = 0, 255, 51
    y = np.arange(12) % 3
    xt = rng.integers(0, 256, (4, 6, 7), dtype=np.uint8)
    a = load_npz(_save(tmp_path / "g.npz", x=x, y=y, x_test=xt, y_test=np.arange(4) % 3), 0.25, 0)
    assert a.x_train.shape == (12, 1, 6, 7) and a.x_test.shape == (4, 1, 6, 7)
    assert a.x_train.dtype == torch.float32
    # 0 -> 0.0, 255 -> 1.0, 51 -> 51/255 = 0.2
    assert a.x_train[0, 0, 0, :3].tolist() == pytest.approx([0.0, 1.0, 0.2])
    assert torch.allclose(a.x_train[:, 0], torch.from_numpy(x).float() / 255)
    assert torch.allclose(a.x_test[:, 0], torch.from_numpy(xt).float() / 255)


def test_load_npz_channels_last_rgb_transposed(tmp_path):
    rng = np.random.default_rng(2)
    x = rng.integers(0, 256, (10, 5, 6, 3), dtype=np.uint8)  # N×H×W×C
    xt = rng.integers(0, 256, (4, 5, 6, 3), dtype=np.uint8)
    a = load_npz(_save(tmp_path / "rgb.npz", x=x, y=np.arange(10) % 2, x_test=xt, y_test=np.arange(4) % 2), 0.25, 0)
    assert a.x_train.shape == (10, 3, 5, 6) and a.x_test.shape == (4, 3, 5, 6)
    assert a.input_shape == (3, 5, 6)
    # x_train[n, c, h, w] == x[n, h, w, c] / 255
    assert a.x_train[3, 2, 4, 1].item() == pytest.approx(x[3, 4, 1, 2] / 255)
    assert torch.allclose(a.x_train, torch.from_numpy(x).permute(0, 3, 1, 2).float() / 255)
    assert a.x_train.is_contiguous()


def test_load_npz_channels_first_kept(tmp_path):
    x = np.random.default_rng(3).random((8, 3, 4, 4), dtype=np.float32)
    a = load_npz(_save(tmp_path / "cf.npz", x=x, y=np.arange(8) % 2,
                       x_test=x[:2], y_test=np.array([0, 1])), 0.25, 0)
    assert torch.equal(a.x_train, torch.from_numpy(x))


def test_load_npz_given_test_split_is_not_resplit(tmp_path):
    x = np.arange(40, dtype=np.float32).reshape(10, 4)
    y = np.arange(10) % 5
    xt = -np.arange(12, dtype=np.float32).reshape(3, 4)
    yt = np.array([4, 0, 2])
    a = load_npz(_save(tmp_path / "t.npz", x=x, y=y, x_test=xt, y_test=yt), 0.25, 0)
    assert torch.equal(a.x_train, torch.from_numpy(x)) and torch.equal(a.y_train, torch.from_numpy(y))
    assert torch.equal(a.x_test, torch.from_numpy(xt)) and torch.equal(a.y_test, torch.from_numpy(yt))
    assert a.y_train.dtype == torch.int64
    assert a.d_train is None and a.d_test is None


def test_load_npz_domain_array_follows_the_split(tmp_path):
    # 60 rows; domain r % 3, also written into the first feature so the pairing can be checked
    d = np.arange(60) % 3
    x = np.zeros((60, 4), dtype=np.float32)
    x[:, 0] = d
    x[:, 1] = np.arange(60)
    y = (np.arange(60) // 3) % 2
    a = load_npz(_save(tmp_path / "dom.npz", x=x, y=y, domain=d), 0.25, 0)
    assert a.d_train is not None and a.d_test is not None
    assert len(a.d_train) == len(a.x_train) == 45 and len(a.d_test) == len(a.x_test) == 15
    assert a.d_train.dtype == torch.int64
    assert torch.equal(a.d_train, a.x_train[:, 0].long())
    assert torch.equal(a.d_test, a.x_test[:, 0].long())
    assert set(a.d_train.tolist()) == {0, 1, 2}


def test_load_npz_domain_with_given_test_split(tmp_path):
    x = np.zeros((6, 2), dtype=np.float32)
    a = load_npz(_save(tmp_path / "dt.npz", x=x, y=np.array([0, 1] * 3), domain=np.array([0, 0, 1, 1, 2, 2]),
                       x_test=x[:3], y_test=np.array([0, 1, 0]), domain_test=np.array([2, 1, 0])), 0.25, 0)
    assert a.d_train.tolist() == [0, 0, 1, 1, 2, 2]
    assert a.d_test.tolist() == [2, 1, 0]


def test_load_npz_missing_file(tmp_path):
    path = tmp_path / "nope.npz"
    with pytest.raises(DatasetError, match="file not found") as info:
        load_npz(path, 0.25, 0)
    assert str(path) in str(info.value)


def test_dataset_error_is_a_value_error():
    assert issubclass(DatasetError, ValueError)


def test_load_npz_missing_y(tmp_path):
    path = _save(tmp_path / "noy.npz", x=np.zeros((4, 2)), labels=np.zeros(4, dtype=int))
    with pytest.raises(DatasetError) as info:
        load_npz(path, 0.25, 0)
    msg = str(info.value)
    assert "missing array 'y'" in msg
    assert "found: labels, x" in msg  # what the file does have
    assert str(path) in msg


def test_load_npz_mismatched_lengths(tmp_path):
    path = _save(tmp_path / "len.npz", x=np.zeros((10, 2)), y=np.zeros(9, dtype=int))
    with pytest.raises(DatasetError, match="x has 10 rows but y has 9"):
        load_npz(path, 0.25, 0)


def test_load_npz_domain_length_mismatch(tmp_path):
    path = _save(tmp_path / "dl.npz", x=np.zeros((10, 2)), y=np.zeros(10, dtype=int), domain=np.zeros(7, dtype=int))
    with pytest.raises(DatasetError, match="domain has 7 rows but y has 10"):
        load_npz(path, 0.25, 0)


def test_load_npz_float_labels(tmp_path):
    path = _save(tmp_path / "fl.npz", x=np.zeros((4, 2)), y=np.array([0.0, 1.0, 0.0, 1.0]))
    with pytest.raises(DatasetError, match=r"y must be a 1-D array of class ids 0\.\.C-1"):
        load_npz(path, 0.25, 0)


def test_load_npz_negative_labels(tmp_path):
    path = _save(tmp_path / "neg.npz", x=np.zeros((4, 2)), y=np.array([0, -1, 0, 1]))
    with pytest.raises(DatasetError, match="class ids"):
        load_npz(path, 0.25, 0)


def test_load_npz_x_test_without_y_test(tmp_path):
    path = _save(tmp_path / "xt.npz", x=np.zeros((4, 2)), y=np.array([0, 1, 0, 1]), x_test=np.zeros((2, 2)))
    with pytest.raises(DatasetError, match="give both x_test and y_test, or neither"):
        load_npz(path, 0.25, 0)


def test_load_npz_x_test_row_shape_mismatch(tmp_path):
    path = _save(tmp_path / "xs.npz", x=np.zeros((4, 2)), y=np.array([0, 1, 0, 1]),
                 x_test=np.zeros((2, 3)), y_test=np.array([0, 1]))
    with pytest.raises(DatasetError, match="x_test rows have shape"):
        load_npz(path, 0.25, 0)


def test_load_npz_domain_and_x_test_need_domain_test(tmp_path):
    path = _save(tmp_path / "dnt.npz", x=np.zeros((4, 2)), y=np.array([0, 1, 0, 1]), domain=np.array([0, 0, 1, 1]),
                 x_test=np.zeros((2, 2)), y_test=np.array([0, 1]))
    with pytest.raises(DatasetError, match="give domain_test too"):
        load_npz(path, 0.25, 0)


def test_load_npz_non_numeric_x(tmp_path):
    path = _save(tmp_path / "str.npz", x=np.array(["a", "b"]), y=np.array([0, 1]))
    with pytest.raises(DatasetError, match="x must be numeric"):
        load_npz(path, 0.25, 0)


def test_load_npz_bad_x_rank(tmp_path):
    path = _save(tmp_path / "rank.npz", x=np.zeros(4), y=np.array([0, 1, 0, 1]))
    with pytest.raises(DatasetError, match=r"x must be N×D, N×H×W or N×C×H×W"):
        load_npz(path, 0.25, 0)


def test_load_npz_x_test_y_test_length_mismatch(tmp_path):
    path = _save(tmp_path / "tl.npz", x=np.zeros((4, 2)), y=np.array([0, 1, 0, 1]),
                 x_test=np.zeros((5, 2)), y_test=np.array([0, 1, 0]))
    with pytest.raises(DatasetError, match="x_test has 5 rows but y_test has 3"):
        load_npz(path, 0.25, 0)


def test_load_npz_domain_test_length_mismatch(tmp_path):
    path = _save(tmp_path / "dtl.npz", x=np.zeros((4, 2)), y=np.array([0, 1, 0, 1]), domain=np.array([0, 0, 1, 1]),
                 x_test=np.zeros((3, 2)), y_test=np.array([0, 1, 0]), domain_test=np.array([0, 1]))
    with pytest.raises(DatasetError, match="domain_test has 2 rows but y_test has 3"):
        load_npz(path, 0.25, 0)


# --------------------------------------------------------------------------- MNIST (idx files)


def _idx_images(path: Path, images: np.ndarray) -> None:
    n, rows, cols = images.shape
    path.write_bytes(struct.pack(">iiii", 2051, n, rows, cols) + images.astype(np.uint8).tobytes())


def _idx_labels(path: Path, labels: np.ndarray) -> None:
    path.write_bytes(struct.pack(">ii", 2049, len(labels)) + labels.astype(np.uint8).tobytes())


def _write_mnist(root: Path) -> dict[str, np.ndarray]:
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    data = {
        "x_train": rng.integers(0, 256, (20, 28, 28), dtype=np.uint8),
        "y_train": np.arange(20) % 10,
        "x_test": rng.integers(0, 256, (10, 28, 28), dtype=np.uint8),
        "y_test": (np.arange(10) * 3) % 10,
    }
    data["x_train"][0, 0, 0], data["x_train"][0, 0, 1] = 0, 255
    _idx_images(raw / "train-images-idx3-ubyte", data["x_train"])
    _idx_labels(raw / "train-labels-idx1-ubyte", data["y_train"])
    _idx_images(raw / "t10k-images-idx3-ubyte", data["x_test"])
    _idx_labels(raw / "t10k-labels-idx1-ubyte", data["y_test"])
    return data


def test_load_mnist_from_idx_files(tmp_path):
    data = _write_mnist(tmp_path)
    a = load_mnist(tmp_path)
    assert a.x_train.shape == (20, 1, 28, 28) and a.x_test.shape == (10, 1, 28, 28)
    assert a.x_train.dtype == torch.float32 and a.y_train.dtype == torch.int64
    assert a.x_train[0, 0, 0, :2].tolist() == [0.0, 1.0]  # 0/255, 255/255
    assert torch.allclose(a.x_train[:, 0], torch.from_numpy(data["x_train"]).float() / 255)
    assert torch.allclose(a.x_test[:, 0], torch.from_numpy(data["x_test"]).float() / 255)
    assert a.y_train.tolist() == data["y_train"].tolist()
    assert a.y_test.tolist() == data["y_test"].tolist()
    assert a.n_classes == 10


def test_load_mnist_missing_directory(tmp_path):
    with pytest.raises(DatasetError) as info:
        load_mnist(tmp_path / "data")
    msg = str(info.value)
    assert str((tmp_path / "data").resolve() / "MNIST" / "raw") in msg
    for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
                 "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        assert name in msg
    assert "Nothing is downloaded" in msg


def test_load_mnist_one_file_missing(tmp_path):
    _write_mnist(tmp_path)
    (tmp_path / "MNIST" / "raw" / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(DatasetError, match="MNIST not found"):
        load_mnist(tmp_path)


# --------------------------------------------------------------------------- CIFAR (pickles)


class _Py2Pickler(pickle._Pickler):
    """Writes str and bytes as Python 2 byte strings, as in the real CIFAR python-version files:
    keys read back as b'data' with encoding='bytes' and as 'data' with encoding='latin1'
    (torchvision's), and numpy's array payload is a byte string as it was under Python 2."""

    dispatch = pickle._Pickler.dispatch.copy()

    def _save_py2_string(self, obj: str | bytes) -> None:
        raw = obj.encode("latin1") if isinstance(obj, str) else obj
        if len(raw) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(raw)]) + raw)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(raw)) + raw)
        self.memoize(obj)

    dispatch[str] = _save_py2_string
    dispatch[bytes] = _save_py2_string


def _write_batch(path: Path, data: np.ndarray, labels: list[int], label_key: str) -> None:
    with open(path, "wb") as f:
        _Py2Pickler(f, protocol=2).dump({"batch_label": "test", "data": data, label_key: labels})


def test_py2_pickle_helper_writes_byte_string_keys(tmp_path):
    _write_batch(tmp_path / "b", np.zeros((1, 3072), np.uint8), [3], "labels")
    with open(tmp_path / "b", "rb") as f:
        entry = pickle.load(f, encoding="bytes")
    assert set(entry) == {b"batch_label", b"data", b"labels"}
    assert entry[b"labels"] == [3]
    assert entry[b"data"].shape == (1, 3072)


def test_load_cifar10_from_pickles(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    batches = []
    for i in range(1, 6):  # 5 batches of 4 images
        data = rng.integers(0, 256, (4, 3072), dtype=np.uint8)
        labels = [(4 * (i - 1) + j) % 10 for j in range(4)]
        _write_batch(folder / f"data_batch_{i}", data, labels, "labels")
        batches.append((data, labels))
    test_data = rng.integers(0, 256, (3, 3072), dtype=np.uint8)
    _write_batch(folder / "test_batch", test_data, [7, 8, 9], "labels")

    a = load_cifar(tmp_path, 10)
    assert a.x_train.shape == (20, 3, 32, 32) and a.x_test.shape == (3, 3, 32, 32)
    assert a.x_train.dtype == torch.float32
    assert a.y_train.tolist() == [lab for _, labels in batches for lab in labels]  # batch 1..5 in order
    assert a.y_test.tolist() == [7, 8, 9]
    # a row is 1024 red, 1024 green, 1024 blue values, each 32×32 row-major:
    # x[n, c, h, w] == data[n, c*1024 + h*32 + w] / 255
    all_train = np.concatenate([d for d, _ in batches])
    assert a.x_train[5, 1, 2, 3].item() == pytest.approx(all_train[5, 1 * 1024 + 2 * 32 + 3] / 255)
    assert torch.allclose(a.x_train, torch.from_numpy(all_train).reshape(20, 3, 32, 32).float() / 255)
    assert torch.allclose(a.x_test, torch.from_numpy(test_data).reshape(3, 3, 32, 32).float() / 255)
    assert a.x_train.min() >= 0 and a.x_train.max() <= 1


def test_load_cifar100_from_pickles(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    rng = np.random.default_rng(1)
    train = rng.integers(0, 256, (6, 3072), dtype=np.uint8)
    test = rng.integers(0, 256, (2, 3072), dtype=np.uint8)
    for name, data, fine in (("train", train, [0, 17, 42, 99, 5, 63]), ("test", test, [99, 0])):
        with open(folder / name, "wb") as f:
            _Py2Pickler(f, protocol=2).dump({"data": data, "fine_labels": fine, "coarse_labels": [0] * len(fine)})
    a = load_cifar(tmp_path, 100)
    assert a.x_train.shape == (6, 3, 32, 32) and a.x_test.shape == (2, 3, 32, 32)
    assert a.y_train.tolist() == [0, 17, 42, 99, 5, 63]  # the fine labels, not the coarse ones
    assert a.y_test.tolist() == [99, 0]
    assert a.n_classes == 100
    assert torch.allclose(a.x_test, torch.from_numpy(test).reshape(2, 3, 32, 32).float() / 255)


@pytest.mark.parametrize("n_classes, folder, names", [
    (10, "cifar-10-batches-py", ["data_batch_1", "data_batch_5", "test_batch"]),
    (100, "cifar-100-python", ["train", "test"]),
])
def test_load_cifar_missing_files(tmp_path, n_classes, folder, names):
    with pytest.raises(DatasetError) as info:
        load_cifar(tmp_path, n_classes)
    msg = str(info.value)
    assert f"CIFAR-{n_classes} not found" in msg
    assert str((tmp_path / folder).resolve()) in msg
    for name in names:
        assert name in msg


def test_load_cifar10_partly_missing(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    _write_batch(folder / "data_batch_1", np.zeros((1, 3072), np.uint8), [0], "labels")
    with pytest.raises(DatasetError, match="cifar-10-batches-py"):
        load_cifar(tmp_path, 10)
