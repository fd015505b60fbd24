"""CIFAR-10 / CIFAR-100 from the python-pickle distribution, read without running arbitrary pickles.

The files are Python 2 pickles holding dicts of byte strings, lists, ints and uint8 numpy arrays. A
normal `pickle.load` would call whatever a file names, so a tampered file could run code; the
unpickler here resolves exactly the three names a numpy array needs and refuses everything else.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np

from layerpar.data.base import DataError, Raw

# numpy's own array reconstructor, whatever module (numpy.core / numpy._core) this numpy keeps it in.
_RECONSTRUCT = np.ndarray.__reduce__(np.zeros(1))[0]
_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"): _RECONSTRUCT,  # what the files (numpy 1.x) name
    ("numpy._core.multiarray", "_reconstruct"): _RECONSTRUCT,  # what numpy 2 writes
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
}

DEFAULT_ROOT = "data"
MEAN = {"cifar10": (0.4914, 0.4822, 0.4465), "cifar100": (0.5071, 0.4865, 0.4409)}
STD = {"cifar10": (0.2470, 0.2435, 0.2616), "cifar100": (0.2673, 0.2564, 0.2762)}
_LAYOUT = {  # folder, training files, test file, meta file, label key, label-names key
    "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], "test_batch",
                "batches.meta", "labels", "label_names"),
    "cifar100": ("cifar-100-python", ["train"], "test", "meta", "fine_labels", "fine_label_names"),
}
_ARCHIVE = {"cifar10": "cifar-10-python.tar.gz", "cifar100": "cifar-100-python.tar.gz"}


class _Refused(pickle.UnpicklingError):
    """The pickle names something outside the allow-list; the message is that name."""


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise _Refused(f"{module}.{name}") from None

    def persistent_load(self, pid):
        raise _Refused(f"persistent id {pid!r}")


def _decode(obj):
    """Python 2 str keys and names arrive as bytes; make them str."""
    return obj.decode("latin1") if isinstance(obj, bytes) else obj


def safe_load(path: Path) -> dict:
    """Unpickle a CIFAR file allowing only plain data and numpy arrays; keys come back as str."""
    try:
        with open(path, "rb") as f:
            obj = _RestrictedUnpickler(f, encoding="bytes").load()
    except _Refused as exc:
        raise DataError(
            f"{path} names {exc}, which a CIFAR file never holds; refusing to unpickle it "
            "(replace it with the original file from https://www.cs.toronto.edu/~kriz/cifar.html)"
        ) from None
    except Exception as exc:  # truncated file, wrong format: never a bare traceback
        raise DataError(f"{path} is not a readable CIFAR pickle ({type(exc).__name__}: {exc})") from None
    if not isinstance(obj, dict):
        raise DataError(f"{path} holds a {type(obj).__name__}, not the dict a CIFAR file holds")
    return {_decode(k): v for k, v in obj.items()}


def _read_batch(path: Path, label_key: str) -> tuple[np.ndarray, np.ndarray]:
    """One data file -> (x uint8 (N, 3, 32, 32), y int64 (N,))."""
    d = safe_load(path)
    data, labels = d.get("data"), d.get(label_key)
    if not (isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 2
            and data.shape[1] == 3 * 32 * 32):
        raise DataError(f"{path} has no 'data' array of uint8 rows of 3072 pixels")
    if not isinstance(labels, list) or len(labels) != len(data):
        raise DataError(f"{path} has no '{label_key}' list with one label per row of 'data'")
    return data.reshape(-1, 3, 32, 32), np.asarray(labels, dtype=np.int64)


def _find_folder(name: str, root: str | None) -> Path:
    folder = _LAYOUT[name][0]
    base = Path(root or DEFAULT_ROOT).expanduser()
    for candidate in (base / folder, base):  # root may be the parent or the folder itself
        if (candidate / _LAYOUT[name][3]).is_file():
            return candidate
    raise DataError(
        f"{name} not found: expected {base / folder}/ (download {_ARCHIVE[name]} from "
        f"https://www.cs.toronto.edu/~kriz/cifar.html, run `tar xzf {_ARCHIVE[name]} -C {base}`, "
        "or set data.root to the directory that holds it)"
    )


def load_cifar(name: str, root: str | None) -> Raw:
    """CIFAR-10 or CIFAR-100 (fine labels): uint8 images (N, 3, 32, 32), 50000 train / 10000 test."""
    _, train_files, test_file, meta_file, label_key, names_key = _LAYOUT[name]
    folder = _find_folder(name, root)
    missing = [f for f in [*train_files, test_file] if not (folder / f).is_file()]
    if missing:
        raise DataError(f"{name} in {folder} is incomplete: missing {', '.join(missing)}")
    parts = [_read_batch(folder / f, label_key) for f in train_files]
    x_test, y_test = _read_batch(folder / test_file, label_key)
    names = safe_load(folder / meta_file).get(names_key)
    if not isinstance(names, list):
        raise DataError(f"{folder / meta_file} has no '{names_key}' list of class names")
    classes = [str(_decode(n)) for n in names]
    x_train = np.concatenate([p[0] for p in parts])
    y_train = np.concatenate([p[1] for p in parts])
    for y in (y_train, y_test):
        if len(y) and (y.min() < 0 or y.max() >= len(classes)):
            raise DataError(f"{name} in {folder} has labels outside 0..{len(classes) - 1}")
    return Raw(x_train, y_train, x_test, y_test, classes, 1 / 255, MEAN[name], STD[name])
