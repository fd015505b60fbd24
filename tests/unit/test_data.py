"""layerpar.data: splits, normalisation, file formats, the restricted unpickler, batches, resizing.

    .venv/bin/python -m pytest -q tests/unit/test_data.py
"""

from __future__ import annotations

import gzip
import os
import pickle
import pickletools
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from layerpar.config import Config
from layerpar.data import DataError, Split, batches, load_dataset
from layerpar.data.base import stratified_split
from layerpar.data.cifar import safe_load
from layerpar.data.sources import FASHION_ROOT

pytestmark = pytest.mark.unit


def cfg_for(data: dict, **model) -> Config:
    return Config().replace(data=data, model=model)


# ----------------------------------------------------------------------------- digits


def test_digits_shapes_sizes_and_normalisation():
    s = load_dataset(cfg_for({"name": "digits", "val_fraction": 0.1}))
    assert len(s.train) + len(s.val) + len(s.test) == 1797
    assert abs(len(s.test) - 0.2 * 1797) <= 10 and abs(len(s.val) - 0.1 * (len(s.train) + len(s.val))) <= 10
    for part in (s.train, s.val, s.test):
        assert part.x.dtype == torch.float32 and part.y.dtype == torch.int64
        assert part.x.shape[1:] == (1, 8, 8) and part.x.shape[0] == len(part.y)
    assert s.image_shape == (1, 8, 8) and s.classes == [str(i) for i in range(10)]
    assert abs(s.train.x.mean().item()) < 0.05 and abs(s.train.x.std().item() - 1) < 0.05


def test_digits_split_is_stratified_and_seeded():
    s = load_dataset(cfg_for({"name": "digits"}))
    counts = [torch.bincount(p.y, minlength=10) for p in (s.train, s.val, s.test)]
    total = sum(counts)
    for c in range(10):  # every class is held out in the same proportion (+-1 for rounding)
        assert abs(counts[2][c] - 0.2 * total[c]) <= 1
    again = load_dataset(cfg_for({"name": "digits"}))
    assert torch.equal(again.test.x, s.test.x) and torch.equal(again.train.y, s.train.y)
    other = load_dataset(cfg_for({"name": "digits", "seed": 1}))
    assert not torch.equal(other.test.x, s.test.x)


def test_stratified_split_is_a_partition():
    y = np.repeat(np.arange(5), [10, 20, 30, 7, 3])
    keep, held = stratified_split(y, 0.3, seed=4)
    assert sorted(np.concatenate([keep, held]).tolist()) == list(range(len(y)))
    assert np.bincount(y[held], minlength=5).tolist() == [3, 6, 9, 2, 1]


def test_limit_train_and_mismatches():
    s = load_dataset(cfg_for({"name": "digits", "limit_train": 100}))
    assert len(s.train) == 100 and len(s.test) > 300
    with pytest.raises(DataError, match=r"1 channel\(s\) but model.in_channels is 3"):
        load_dataset(cfg_for({"name": "digits"}, in_channels=3))
    with pytest.raises(DataError, match="model.num_classes is 5"):
        load_dataset(cfg_for({"name": "digits"}, num_classes=5))


# ----------------------------------------------------------------------------- Fashion-MNIST


@pytest.mark.skipif(not Path(FASHION_ROOT).is_dir(),
                    reason=f"{FASHION_ROOT} absent: apt-get install -y dataset-fashion-mnist")
def test_fashion_mnist_from_debian_package():
    s = load_dataset(cfg_for({"name": "fashion_mnist", "val_fraction": 0.1}, image_size=28, patch_size=4))
    assert len(s.train) + len(s.val) == 60000 and len(s.val) == 6000 and len(s.test) == 10000
    assert s.train.x.shape[1:] == (1, 28, 28) and s.classes[9] == "Ankle boot"
    low, high = (0 - 0.2860) / 0.3530, (1 - 0.2860) / 0.3530  # pixels 0..255 after normalisation
    assert s.test.x.min().item() == pytest.approx(low) and s.test.x.max().item() == pytest.approx(high)
    assert torch.bincount(s.test.y).tolist() == [1000] * 10


def _write_idx(path: Path, arr: np.ndarray) -> None:
    header = bytes([0, 0, 8, arr.ndim]) + b"".join(struct.pack(">I", d) for d in arr.shape)
    data = header + arr.astype(np.uint8).tobytes()
    if path.suffix == ".gz":
        data = gzip.compress(data)
    path.write_bytes(data)


def test_fashion_mnist_from_root_gz_or_plain(tmp_path):
    rng = np.random.default_rng(0)
    _write_idx(tmp_path / "train-images-idx3-ubyte.gz", rng.integers(0, 256, (40, 28, 28)))
    _write_idx(tmp_path / "train-labels-idx1-ubyte", np.arange(40) % 10)  # uncompressed name
    _write_idx(tmp_path / "t10k-images-idx3-ubyte", np.full((10, 28, 28), 255))
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.arange(10))
    s = load_dataset(cfg_for({"name": "fashion_mnist", "root": str(tmp_path), "val_fraction": 0.25},
                             image_size=28, patch_size=4))
    assert (len(s.train), len(s.val), len(s.test)) == (30, 10, 10)
    assert torch.allclose(s.test.x, torch.full_like(s.test.x, (1 - 0.2860) / 0.3530))
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes(b"\x00\x00\x08\x03" + struct.pack(">III", 10, 28, 28))
    with pytest.raises(DataError, match="truncated"):
        load_dataset(cfg_for({"name": "fashion_mnist", "root": str(tmp_path)}, image_size=28, patch_size=4))


def test_fashion_mnist_missing_root_says_what_to_do(tmp_path):
    with pytest.raises(DataError) as err:
        load_dataset(cfg_for({"name": "fashion_mnist", "root": str(tmp_path / "nowhere")}))
    assert "apt-get install -y dataset-fashion-mnist" in str(err.value) and "data.root" in str(err.value)


# ----------------------------------------------------------------------------- CIFAR


class _Py2Pickler(pickle._Pickler):
    """Writes str and bytes as Python 2 `str` opcodes, as the real (Python 2 cPickle) CIFAR files do."""

    dispatch = pickle._Pickler.dispatch.copy()

    def _save_py2_str(self, obj: str | bytes) -> None:
        data = obj.encode("latin1") if isinstance(obj, str) else obj
        if len(data) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(data)]) + data)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(data)) + data)

    dispatch[bytes] = dispatch[str] = _save_py2_str


def _dump(path: Path, obj) -> None:
    """Pickle as the distribution does: protocol 2, py2 strings, numpy arrays via numpy.core."""
    with open(path, "wb") as f:
        _Py2Pickler(f, protocol=2).dump(obj)
    data = path.read_bytes().replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n")
    path.write_bytes(data)


def _batch(n: int, label_key: bytes, num_classes: int, rng) -> dict:
    return {b"batch_label": b"fake", label_key: (np.arange(n) % num_classes).tolist(),
            b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
            b"filenames": [b"img_%d.png" % i for i in range(n)]}


def fake_cifar10(root: Path, rows: int = 20) -> Path:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(1, 6):
        _dump(folder / f"data_batch_{i}", _batch(rows, b"labels", 10, rng))
    _dump(folder / "test_batch", _batch(rows, b"labels", 10, rng))
    _dump(folder / "batches.meta", {b"num_cases_per_batch": rows, b"num_vis": 3072,
                                    b"label_names": [b"airplane", b"automobile", b"bird", b"cat", b"deer",
                                                     b"dog", b"frog", b"horse", b"ship", b"truck"]})
    return folder


def fake_cifar100(root: Path) -> Path:
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)
    for name, n in (("train", 300), ("test", 100)):
        d = _batch(n, b"fine_labels", 100, rng)
        d[b"coarse_labels"] = (np.arange(n) % 20).tolist()
        _dump(folder / name, d)
    _dump(folder / "meta", {b"fine_label_names": [b"c%d" % i for i in range(100)],
                            b"coarse_label_names": [b"s%d" % i for i in range(20)]})
    return folder


CIFAR_MODEL = {"image_size": 32, "patch_size": 4, "in_channels": 3}


def test_cifar10_real_format(tmp_path):
    folder = fake_cifar10(tmp_path)
    ops = {(op.name, arg) for op, arg, _ in pickletools.genops((folder / "test_batch").read_bytes())}
    assert ("PROTO", 2) in ops and ("GLOBAL", "numpy.core.multiarray _reconstruct") in ops  # as real
    s = load_dataset(cfg_for({"name": "cifar10", "root": str(tmp_path), "val_fraction": 0.2}, **CIFAR_MODEL))
    assert (len(s.train), len(s.val), len(s.test)) == (80, 20, 20)
    assert s.classes[0] == "airplane" and s.image_shape == (3, 32, 32)
    raw = safe_load(folder / "test_batch")  # the test split is used as it is: row 0 stays row 0
    first = raw["data"][0].reshape(3, 32, 32) / 255
    mean, std = np.array([0.4914, 0.4822, 0.4465]), np.array([0.2470, 0.2435, 0.2616])
    expected = (first - mean[:, None, None]) / std[:, None, None]
    assert np.allclose(s.test.x[0].numpy(), expected, atol=1e-5) and s.test.y[0] == raw["labels"][0]
    # root may also name the batches folder itself
    s2 = load_dataset(cfg_for({"name": "cifar10", "root": str(folder), "val_fraction": 0.2}, **CIFAR_MODEL))
    assert torch.equal(s2.train.x, s.train.x)


def test_cifar100_real_format(tmp_path):
    fake_cifar100(tmp_path)
    s = load_dataset(cfg_for({"name": "cifar100", "root": str(tmp_path)}, num_classes=100, **CIFAR_MODEL))
    assert len(s.train) + len(s.val) == 300 and len(s.test) == 100 and len(s.classes) == 100
    assert s.test.y.tolist() == list(range(100))
    with pytest.raises(DataError, match="100 classes but model.num_classes is 10"):
        load_dataset(cfg_for({"name": "cifar100", "root": str(tmp_path)}, **CIFAR_MODEL))


class _Evil:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_refused_and_nothing_runs(tmp_path):
    folder = fake_cifar10(tmp_path, rows=10)
    marker = tmp_path / "pwned"
    _dump(folder / "test_batch", {b"data": _Evil(marker), b"labels": [0]})
    with pytest.raises(DataError, match="system.*refusing to unpickle"):
        load_dataset(cfg_for({"name": "cifar10", "root": str(tmp_path)}, **CIFAR_MODEL))
    assert not marker.exists()


def test_cifar_missing_or_broken_files(tmp_path):
    with pytest.raises(DataError, match=r"cifar10 not found.*cifar-10-python.tar.gz.*data.root"):
        load_dataset(cfg_for({"name": "cifar10", "root": str(tmp_path)}, **CIFAR_MODEL))
    folder = fake_cifar10(tmp_path, rows=10)
    (folder / "data_batch_2").write_bytes((folder / "data_batch_2").read_bytes()[:500])
    with pytest.raises(DataError, match="data_batch_2 is not a readable CIFAR pickle"):
        load_dataset(cfg_for({"name": "cifar10", "root": str(tmp_path)}, **CIFAR_MODEL))
    (folder / "data_batch_3").unlink()
    with pytest.raises(DataError, match="missing data_batch_3"):
        load_dataset(cfg_for({"name": "cifar10", "root": str(tmp_path)}, **CIFAR_MODEL))


# ----------------------------------------------------------------------------- resize


def test_resize_is_lazy_and_bilinear(tmp_path):
    fake_cifar10(tmp_path, rows=10)
    s = load_dataset(cfg_for({"name": "cifar10", "root": str(tmp_path)},
                             **{**CIFAR_MODEL, "image_size": 224, "patch_size": 16}))
    assert s.train.x.shape[1:] == (3, 32, 32)  # kept native: memory stays small
    assert s.image_shape == (3, 224, 224) and s.train.image_shape == (3, 224, 224)
    x, y = next(batches(s.train, 4, seed=0, epoch=0, shuffle=False))
    assert x.shape == (4, 3, 224, 224) and torch.equal(y, s.train.y[:4])
    assert torch.allclose(x, F.interpolate(s.train.x[:4], size=(224, 224), mode="bilinear",
                                           align_corners=False))
    small = load_dataset(cfg_for({"name": "digits"}, image_size=4, patch_size=2))
    assert next(batches(small.test, 3, seed=0, epoch=0))[0].shape == (3, 1, 4, 4)


# ----------------------------------------------------------------------------- synthetic


def test_synthetic_is_seeded_and_learnable():
    cfg = cfg_for({"name": "synthetic", "synthetic_size": 400, "seed": 3}, num_classes=4)
    a, b = load_dataset(cfg), load_dataset(cfg)
    assert torch.equal(a.train.x, b.train.x) and torch.equal(a.test.y, b.test.y)
    assert len(a.train) + len(a.val) + len(a.test) == 400 and a.image_shape == (1, 8, 8)
    c = load_dataset(cfg.replace(data={"seed": 4}))
    assert not torch.equal(a.train.x, c.train.x)
    # nearest class mean classifies the test split: the patterns carry the label
    means = torch.stack([a.train.x[a.train.y == k].mean(0) for k in range(4)]).flatten(1)
    pred = torch.cdist(a.test.x.flatten(1), means).argmin(1)
    assert (pred == a.test.y).float().mean() > 0.9
    big = load_dataset(cfg_for({"name": "synthetic"}, image_size=224, patch_size=16, in_channels=3))
    assert big.train.x.shape[1:] == (3, 32, 32) and big.image_shape == (3, 224, 224)


# ----------------------------------------------------------------------------- batches


def _numbered(n: int) -> Split:
    return Split(torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1), torch.arange(n))


def test_batches_deterministic_and_cover_the_split():
    split = _numbered(103)
    order = lambda **kw: torch.cat([y for _, y in batches(split, 10, seed=5, **kw)])  # noqa: E731
    first = order(epoch=0)
    assert sorted(first.tolist()) == list(range(103))  # every sample exactly once
    assert torch.equal(first, order(epoch=0)) and not torch.equal(first, order(epoch=1))
    assert not torch.equal(first, torch.cat([y for _, y in batches(split, 10, seed=6, epoch=0)]))
    assert torch.equal(order(epoch=0, shuffle=False), torch.arange(103))
    sizes = [len(y) for _, y in batches(split, 10, seed=5, epoch=0)]
    assert sizes == [10] * 10 + [3]
    dropped = [len(y) for _, y in batches(split, 10, seed=5, epoch=0, drop_last=True)]
    assert dropped == [10] * 10
    resumed = torch.cat([y for _, y in batches(split, 10, seed=5, epoch=0, skip=4)])
    assert torch.equal(resumed, first[40:])
    for x, y in batches(split, 7, seed=0, epoch=2):  # x and y stay paired
        assert torch.equal(x.flatten().long(), y)


# ----------------------------------------------------------------------------- image folders


def folder_cfg(root, **model):
    return cfg_for({"name": "folder", "root": str(root), "val_fraction": 0.25},
                   **{"image_size": 8, "num_classes": 3, "patch_size": 4, **model})


def test_image_folder_reads_train_and_test_trees(tmp_path):
    from tests.imagefolder import CLASSES, make_tree

    root = make_tree(tmp_path / "imgs", per_class=8, test_per_class=3, side=12)
    splits = load_dataset(folder_cfg(root))
    assert splits.classes == list(CLASSES) and splits.image_shape == (1, 8, 8)  # resized to 8x8
    assert len(splits.train) + len(splits.val) == 24 and len(splits.test) == 9
    assert splits.test.y.tolist() == [0] * 3 + [1] * 3 + [2] * 3  # sorted class folders
    x = splits.train.x
    assert x.dtype == torch.float32 and abs(x.mean().item()) < 0.1  # normalised by train's stats
    rgb = load_dataset(folder_cfg(make_tree(tmp_path / "rgb", per_class=4, mode="RGB"), in_channels=3))
    assert rgb.image_shape == (3, 8, 8)


def test_image_folder_without_test_tree_splits_by_seed(tmp_path):
    from tests.imagefolder import make_tree

    root = make_tree(tmp_path / "imgs", per_class=10, with_test=False)
    a, b = load_dataset(folder_cfg(root)), load_dataset(folder_cfg(root))
    assert len(a.test) == 6 and torch.equal(a.test.x, b.test.x)  # 20% of each class, fixed by seed
    assert sorted(a.test.y.tolist()) == [0, 0, 1, 1, 2, 2]


@pytest.mark.parametrize("setup,words", [
    (lambda root: None, "not found or has no train/ directory"),
    (lambda root: (root / "train" / "a").mkdir(parents=True) or (root / "train" / "b").mkdir(),
     "holds no images"),
    (lambda root: (root / "train" / "a").mkdir(parents=True), "at least 2 class folders"),
])
def test_image_folder_missing_or_empty_is_one_clear_error(tmp_path, setup, words):
    root = tmp_path / "imgs"
    setup(root)
    with pytest.raises(DataError, match=words):
        load_dataset(folder_cfg(root))


def test_limit_train_keeps_every_class_of_a_class_ordered_source():
    """An image folder lists its samples class by class: data.limit_train is a seeded sample, not the
    first n (which trained a 10x Fashion-MNIST folder on its first classes only: test accuracy 0.10)."""
    from layerpar.data.base import limit_rows

    labels = np.repeat(np.arange(10), 100)  # class-ordered, as a folder's listing
    rows = limit_rows(np.arange(1000), 100, seed=0)
    assert len(rows) == 100 and np.all(np.diff(rows) > 0)
    assert set(labels[rows]) == set(range(10))
    assert np.array_equal(rows, limit_rows(np.arange(1000), 100, seed=0))  # seeded
    assert np.array_equal(limit_rows(np.arange(5), 0, seed=0), np.arange(5))
