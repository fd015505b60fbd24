"""Loaders that read a dataset as it is stored: digits (scikit-learn), Fashion-MNIST (IDX), synthetic.

Each returns a Raw (images (N, C, H, W) before normalisation, a test split, class names, constants).
Nothing is downloaded: a missing dataset is a DataError saying what to install or where to put it.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import torch

from layerpar.data.base import DataError, Raw, stratified_split

TEST_FRACTION = 0.2
"""Share of digits / synthetic held out as the test split (these datasets ship without one)."""

FASHION_ROOT = "/usr/share/datasets/fashion-mnist"  # where Debian's dataset-fashion-mnist installs it
FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
                   "Bag", "Ankle boot"]
_FASHION_FILES = {  # part -> stem of the IDX file (plain, or with .gz)
    "x_train": "train-images-idx3-ubyte", "y_train": "train-labels-idx1-ubyte",
    "x_test": "t10k-images-idx3-ubyte", "y_test": "t10k-labels-idx1-ubyte",
}


def load_digits(seed: int) -> Raw:
    """scikit-learn's 1797 8x8 digits (pixels 0..16), a stratified 20% test split fixed by seed."""
    try:
        from sklearn.datasets import load_digits as sk_load_digits
    except ImportError:
        raise DataError("the digits dataset ships with scikit-learn: pip install scikit-learn") from None
    d = sk_load_digits()
    x = d.images.astype(np.uint8)[:, None]  # (1797, 1, 8, 8), exact: pixels are integers 0..16
    y = d.target.astype(np.int64)
    train, test = stratified_split(y, TEST_FRACTION, seed, salt=1)
    return Raw(x[train], y[train], x[test], y[test], [str(c) for c in d.target_names],
               1 / 16, (0.3053,), (0.3760,))


def _read_idx(path: Path) -> np.ndarray:
    """An IDX file of unsigned bytes (gzip or plain) -> array of the shape its header gives."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except OSError as exc:
        raise DataError(f"{path} could not be read ({exc}); reinstall the dataset") from None
    # header: 2 zero bytes, type code 0x08 (ubyte), number of dims, then each dim as big-endian uint32
    if len(raw) < 4 or raw[:3] != b"\x00\x00\x08":
        raise DataError(f"{path} is not an IDX file of unsigned bytes (bad header)")
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    body = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(dims)):
        raise DataError(f"{path} is truncated: header says {dims}, found {body.size} bytes of data")
    return body.reshape(dims)


def load_fashion_mnist(root: str | None) -> Raw:
    """Fashion-MNIST from its four IDX files: 60000 train / 10000 test, 28x28 grey, 10 classes."""
    folder = Path(root or FASHION_ROOT).expanduser()
    parts = {}
    for part, stem in _FASHION_FILES.items():
        found = [folder / n for n in (f"{stem}.gz", stem) if (folder / n).is_file()]
        if not found:
            raise DataError(
                f"Fashion-MNIST not found: {folder} has no {stem}[.gz]; install it with "
                f"`apt-get install -y dataset-fashion-mnist` (puts it in {FASHION_ROOT}) or set "
                "data.root to a directory holding the four IDX files"
            )
        parts[part] = _read_idx(found[0])
    for split in ("train", "test"):
        x, y = parts[f"x_{split}"], parts[f"y_{split}"]
        if x.ndim != 3 or y.ndim != 1 or len(x) != len(y):
            raise DataError(f"Fashion-MNIST in {folder}: {split} images {x.shape} do not match labels "
                            f"{y.shape}")
    return Raw(parts["x_train"][:, None], parts["y_train"].astype(np.int64),
               parts["x_test"][:, None], parts["y_test"].astype(np.int64),
               list(FASHION_CLASSES), 1 / 255, (0.2860,), (0.3530,))


def load_synthetic(size: int, *, num_classes: int, channels: int, side: int, seed: int) -> Raw:
    """`size` images, each its class's fixed random pattern plus as much noise: learnable, seeded.

    Values have unit variance already (mean 0, std 1 constants). Generated at most 32x32 so a
    224x224 model costs memory per batch only (batches() resizes).
    """
    g = torch.Generator().manual_seed(seed)
    side = min(side, 32)
    templates = torch.randn(num_classes, channels, side, side, generator=g)  # one pattern per class
    y = (torch.arange(size) % num_classes)[torch.randperm(size, generator=g)]  # balanced classes
    x = (templates[y] + torch.randn(size, channels, side, side, generator=g)) / 2**0.5
    x, y = x.numpy(), y.numpy()
    train, test = stratified_split(y, TEST_FRACTION, seed, salt=1)
    return Raw(x[train], y[train], x[test], y[test], [f"class_{c}" for c in range(num_classes)],
               1.0, (0.0,) * channels, (1.0,) * channels)
