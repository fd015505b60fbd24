"""Datasets as normalised float32 tensors, read from local files only (nothing is downloaded).

    splits = load_dataset(cfg)                      # Splits(train, val, test, classes, image_shape)
    for x, y in batches(splits.train, 64, seed=0, epoch=e):
        ...                                         # x (B, C, H, W) at model.image_size, y (B,)

Datasets (cfg.data.name): digits (scikit-learn), fashion_mnist (IDX files, Debian package
dataset-fashion-mnist), cifar10 / cifar100 (python-pickle distribution in a local directory),
synthetic (seeded class patterns), folder (your own images, ROOT/train/<class>/*.png|jpg, read with
Pillow). Images whose side differs from model.image_size are resized
bilinearly per batch; a channel or class-count mismatch with the model is a DataError.
"""

from __future__ import annotations

from layerpar.data.base import (
    DataError,
    Raw,
    Split,
    Splits,
    batches,
    batches_per_epoch,
    limit_rows,
    stratified_split,
    to_split,
)
from layerpar.data.cifar import load_cifar
from layerpar.data.folder import load_folder
from layerpar.data.sources import load_digits, load_fashion_mnist, load_synthetic
from layerpar.data.text import load_text

__all__ = ["DataError", "Split", "Splits", "batches", "batches_per_epoch", "load_dataset"]


def _read(cfg) -> Raw:
    d, m = cfg.data, cfg.model
    if d.name == "digits":
        return load_digits(d.seed)
    if d.name == "fashion_mnist":
        return load_fashion_mnist(d.root)
    if d.name in ("cifar10", "cifar100"):
        return load_cifar(d.name, d.root)
    if d.name == "folder":
        return load_folder(d.root, channels=m.in_channels, side=m.image_size, seed=d.seed)
    if d.name == "synthetic":
        return load_synthetic(d.synthetic_size, num_classes=m.num_classes, channels=m.in_channels,
                              side=m.image_size, seed=d.seed)
    raise DataError(f"data.name {d.name!r} is not a known dataset")


def load_dataset(cfg) -> Splits:
    """Read cfg.data.name, carve val (stratified, seeded) out of train, normalise, fit the model's shape."""
    d, m = cfg.data, cfg.model
    if d.name == "text":  # the language models' corpus: windows of tokens (data/text.py)
        return load_text(cfg)
    raw = _read(cfg)
    channels, side = raw.x_train.shape[1], raw.x_train.shape[-1]
    if channels != m.in_channels:
        raise DataError(f"{d.name} images have {channels} channel(s) but model.in_channels is "
                        f"{m.in_channels}; set model.in_channels={channels}")
    if len(raw.classes) != m.num_classes:
        raise DataError(f"{d.name} has {len(raw.classes)} classes but model.num_classes is "
                        f"{m.num_classes}; set model.num_classes={len(raw.classes)}")
    size = m.image_size if m.image_size != side else None  # resized lazily, per batch
    train, val = stratified_split(raw.y_train, d.val_fraction, d.seed, salt=2)
    train = limit_rows(train, d.limit_train, d.seed)

    def split(x, y, rows=None) -> Split:
        # index the raw (uint8) arrays first: only the rows kept are ever converted to float32
        if rows is not None:
            x, y = x[rows], y[rows]
        return to_split(x, y, scale=raw.scale, mean=raw.mean, std=raw.std, size=size)

    parts = (split(raw.x_train, raw.y_train, train), split(raw.x_train, raw.y_train, val),
             split(raw.x_test, raw.y_test))
    return Splits(*parts, classes=raw.classes, image_shape=(channels, m.image_size, m.image_size))
