"""Raw datasets as tensors: the embedded digits, bring-your-own .npz, and standard benchmarks.

Nothing is ever downloaded. Standard benchmarks are read by torchvision from a local
directory; when their files are missing the error says exactly where to put them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch


class DatasetError(ValueError):
    """Data that cannot be used: missing files, bad arrays. The message says how to fix it."""


@dataclass(frozen=True)
class Arrays:
    """A dataset split in train/test; images as float32 N×C×H×W (or N×D for flat features)."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    #: Optional per-sample domain ids (npz ``domain``), for domain-incremental streams.
    d_train: torch.Tensor | None = None
    d_test: torch.Tensor | None = None

    @property
    def n_classes(self) -> int:
        return int(max(self.y_train.max(), self.y_test.max())) + 1

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])


def load_digits(test_fraction: float, seed: int) -> Arrays:
    """scikit-learn's bundled 8×8 digits (1,797 images, 10 classes), stratified split."""
    from sklearn.datasets import load_digits as sk_load_digits
    from sklearn.model_selection import train_test_split

    digits = sk_load_digits()
    x = (digits.data.astype(np.float32) / 16.0).reshape(-1, 1, 8, 8)
    y = digits.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(
        x, y, test_size=test_fraction, random_state=seed, stratify=y
    )
    return Arrays(*(torch.from_numpy(a) for a in (x_tr, y_tr, x_te, y_te)))


def load_npz(path: Path, test_fraction: float, seed: int) -> Arrays:
    """A user's .npz: ``x``, ``y`` and optionally ``x_test``, ``y_test``, ``domain``, ``domain_test``.

    ``x`` may be N×D features, N×H×W grey images, or N×C×H×W / N×H×W×C images (C in 1, 3).
    Integer images (0..255) are scaled to [0, 1].
    """
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"npz stream: file not found: {path}")
    with np.load(path, allow_pickle=False) as f:
        files = dict(f)
    for key in ("x", "y"):
        if key not in files:
            raise DatasetError(f"{path}: missing array {key!r} (found: {', '.join(sorted(files)) or 'none'})")
    if ("x_test" in files) != ("y_test" in files):
        raise DatasetError(f"{path}: give both x_test and y_test, or neither")
    x, y = _images(files["x"], path, "x"), _labels(files["y"], path, "y")
    if len(x) != len(y):
        raise DatasetError(f"{path}: x has {len(x)} rows but y has {len(y)}")
    d = files.get("domain")
    if d is not None and len(d) != len(y):
        raise DatasetError(f"{path}: domain has {len(d)} rows but y has {len(y)}")
    if "x_test" in files:
        x_te, y_te = _images(files["x_test"], path, "x_test"), _labels(files["y_test"], path, "y_test")
        if x_te.shape[1:] != x.shape[1:]:
            raise DatasetError(f"{path}: x_test rows have shape {x_te.shape[1:]}, x rows {x.shape[1:]}")
        if len(x_te) != len(y_te):
            raise DatasetError(f"{path}: x_test has {len(x_te)} rows but y_test has {len(y_te)}")
        d_te = files.get("domain_test")
        if d is not None and d_te is None:
            raise DatasetError(f"{path}: with x_test and domain, give domain_test too")
        if d_te is not None and len(d_te) != len(y_te):
            raise DatasetError(f"{path}: domain_test has {len(d_te)} rows but y_test has {len(y_te)}")
        return Arrays(*(torch.from_numpy(a) for a in (x, y, x_te, y_te)),
                      _maybe(d), _maybe(d_te))
    from sklearn.model_selection import train_test_split

    counts = np.bincount(y)
    stratify = y if counts[counts > 0].min() >= 2 else None
    parts = train_test_split(
        x, y, *(() if d is None else (d,)), test_size=test_fraction, random_state=seed, stratify=stratify
    )
    x_tr, x_te, y_tr, y_te = parts[:4]
    d_tr, d_te = (parts[4], parts[5]) if d is not None else (None, None)
    return Arrays(*(torch.from_numpy(a) for a in (x_tr, y_tr, x_te, y_te)), _maybe(d_tr), _maybe(d_te))


def _maybe(a: np.ndarray | None) -> torch.Tensor | None:
    return None if a is None else torch.from_numpy(np.asarray(a).astype(np.int64))


def _images(x: np.ndarray, path: Path, key: str) -> np.ndarray:
    if not np.issubdtype(x.dtype, np.number):
        raise DatasetError(f"{path}: {key} must be numeric, not {x.dtype}")
    scale = 255.0 if np.issubdtype(x.dtype, np.integer) else 1.0
    x = x.astype(np.float32) / scale
    if x.ndim == 3:
        x = x[:, None]
    elif x.ndim == 4 and x.shape[-1] in (1, 3) and x.shape[1] not in (1, 3):
        x = np.ascontiguousarray(x.transpose(0, 3, 1, 2))
    elif x.ndim not in (2, 4):
        raise DatasetError(f"{path}: {key} must be N×D, N×H×W or N×C×H×W, got shape {x.shape}")
    return x


def _labels(y: np.ndarray, path: Path, key: str) -> np.ndarray:
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer) or (len(y) and y.min() < 0):
        raise DatasetError(f"{path}: {key} must be a 1-D array of class ids 0..C-1")
    return y.astype(np.int64)


def load_mnist(data_dir: Path) -> Arrays:
    """MNIST through torchvision from ``data_dir/MNIST/raw`` (never downloaded)."""
    from torchvision.datasets import MNIST

    data_dir = Path(data_dir)
    try:
        train, test = MNIST(str(data_dir), train=True), MNIST(str(data_dir), train=False)
    except RuntimeError as exc:
        raise DatasetError(
            f"MNIST not found under {data_dir.resolve() / 'MNIST' / 'raw'}: put the four files "
            "train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte, "
            "t10k-labels-idx1-ubyte there (gunzipped), or set stream.data_dir. "
            f"Nothing is downloaded at run time. ({exc})"
        ) from None
    scale = lambda d: (d.data.float() / 255.0).unsqueeze(1)  # noqa: E731
    return Arrays(scale(train), train.targets.long(), scale(test), test.targets.long())


def load_cifar(data_dir: Path, n_classes: int) -> Arrays:
    """CIFAR-10/100 through torchvision from ``data_dir`` (the python-version pickles).

    torchvision's md5 check is skipped (files are only required to exist) so that users can
    point at re-packed copies; the parsing is torchvision's own.
    """
    from torchvision.datasets import CIFAR10, CIFAR100

    base = CIFAR10 if n_classes == 10 else CIFAR100
    folder = Path(data_dir) / base.base_folder

    class _Local(base):  # type: ignore[misc, valid-type]
        def _check_integrity(self) -> bool:
            return all((folder / name).is_file() for name, _ in self.train_list + self.test_list)

        def _load_meta(self) -> None:  # class names are not needed, and meta may be absent
            self.classes, self.class_to_idx = [], {}

    try:
        train, test = _Local(str(data_dir), train=True), _Local(str(data_dir), train=False)
    except RuntimeError:
        names = ", ".join(n for n, _ in base.train_list + base.test_list)
        raise DatasetError(
            f"CIFAR-{n_classes} not found: put the python-version files ({names}) in "
            f"{folder.resolve()} (unpack {base.filename}), or set stream.data_dir. "
            "Nothing is downloaded at run time."
        ) from None
    conv = lambda d: torch.from_numpy(d.data).permute(0, 3, 1, 2).float() / 255.0  # noqa: E731
    return Arrays(conv(train), torch.tensor(train.targets), conv(test), torch.tensor(test.targets))
