"""Your own images: an image-folder tree read with Pillow (data.name: folder, data.root: ROOT).

    ROOT/train/<class>/*.png|jpg|jpeg|bmp|gif|webp
    ROOT/test/<class>/...        (optional: without it, a stratified share of train, fixed by data.seed)

Class names are the sub-folder names, sorted (the label is their index); train and test must name the
same classes. Every image is converted to grey (model.in_channels = 1) or RGB (3) and resized to
model.image_size with Pillow's bilinear filter, once, when the dataset is read; values are scaled to
[0, 1] and normalised per channel with the training split's own mean and std.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from layerpar.data.base import DataError, Raw, stratified_split

SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")
TEST_FRACTION = 0.2
"""Share held out as the test split when ROOT has no test/ tree."""


def _classes(tree: Path) -> list[str]:
    return sorted(p.name for p in tree.iterdir() if p.is_dir() and not p.name.startswith("."))


def _read_tree(tree: Path, classes: list[str], *, mode: str, side: int) -> tuple[np.ndarray, np.ndarray]:
    """Every image under tree/<class>/ -> (uint8 (N, C, side, side), labels (N,)), in sorted order."""
    from PIL import Image, UnidentifiedImageError

    xs, ys = [], []
    for label, name in enumerate(classes):
        files = sorted(f for f in (tree / name).iterdir() if f.suffix.lower() in SUFFIXES)
        for f in files:
            try:
                with Image.open(f) as img:
                    img = img.convert(mode).resize((side, side), Image.Resampling.BILINEAR)
                    arr = np.asarray(img, dtype=np.uint8)
            except (OSError, UnidentifiedImageError) as exc:
                raise DataError(f"{f} is not a readable image ({exc})") from None
            xs.append(arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1))
            ys.append(label)
    if not xs:
        raise DataError(f"{tree} holds no images ({', '.join(SUFFIXES)}) in its class folders")
    return np.stack(xs), np.asarray(ys, dtype=np.int64)


def load_folder(root: str | None, *, channels: int, side: int, seed: int) -> Raw:
    """The tree under `root` as a Raw (uint8 images at the model's side)."""
    if not root:
        raise DataError("data.name=folder needs data.root: a directory with train/<class>/ image folders")
    base = Path(root).expanduser()
    train = base / "train"
    if not train.is_dir():
        raise DataError(f"image folder {base} not found or has no train/ directory "
                        "(expected ROOT/train/<class>/*.png|jpg and optionally ROOT/test/<class>/)")
    classes = _classes(train)
    if len(classes) < 2:
        raise DataError(f"{train} must hold at least 2 class folders, found {len(classes)}")
    if channels not in (1, 3):
        raise DataError(f"model.in_channels ({channels}) must be 1 (grey) or 3 (RGB) for image folders")
    mode = "L" if channels == 1 else "RGB"
    x, y = _read_tree(train, classes, mode=mode, side=side)
    test = base / "test"
    if test.is_dir():
        if _classes(test) != classes:
            raise DataError(f"{test} has classes {_classes(test)} but {train} has {classes}; they must match")
        x_test, y_test = _read_tree(test, classes, mode=mode, side=side)
    else:
        keep, held = stratified_split(y, TEST_FRACTION, seed, salt=1)
        x, y, x_test, y_test = x[keep], y[keep], x[held], y[held]
    scaled = x.astype(np.float64) / 255.0
    mean = tuple(float(v) for v in scaled.mean(axis=(0, 2, 3)))
    std = tuple(max(1e-3, float(v)) for v in scaled.std(axis=(0, 2, 3)))
    return Raw(x, y, x_test, y_test, classes, 1 / 255, mean, std)
