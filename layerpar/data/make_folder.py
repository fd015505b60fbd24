"""Write Fashion-MNIST (the Debian package dataset-fashion-mnist) as an image folder of PNGs or as
Parquet files, optionally with K augmented copies of every training image, for streamed training.

    python -m layerpar.data.make_folder runs/fmnist                      # 70 k PNGs, 10 class folders
    python -m layerpar.data.make_folder runs/fmnist10 --copies 10        # 600 k train + 10 k test PNGs
    python -m layerpar.data.make_folder runs/fmnist-pq --format parquet  # train/*.parquet, test/*.parquet

Layout (what data.name=folder and the streaming source read):
    folder:  OUT/train/<k>_<class>/NNNNNN-CC.png   OUT/test/<k>_<class>/NNNNNN-00.png
    parquet: OUT/train/part-NNNNN.parquet          OUT/test/part-NNNNN.parquet
             columns image (PNG bytes), label (int64); schema metadata `classes` (JSON list); rows in
             a seeded random order (the streaming reader shuffles row groups, so files must be mixed)
Class folders are prefixed with the label (0_T-shirt-top ... 9_Ankle-boot) so that their sorted order
is Fashion-MNIST's label order. Copy 00 is the image itself; copies 01..K-1 are augment.py's
flip_crop of it, drawn per image from (seed, copy, image index). The test split is written once,
unaugmented.
The output goes to OUT.partial first and is renamed to OUT when complete; a non-empty OUT is refused.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np

from layerpar.data.augment import CROP_PAD
from layerpar.data.base import DataError
from layerpar.data.sources import FASHION_CLASSES, FASHION_ROOT, load_fashion_mnist


def class_dirs() -> list[str]:
    """Folder names whose sorted order is the label order: 0_T-shirt-top, 1_Trouser, ..."""
    return [f"{k}_{name.replace('/', '-').replace(' ', '-')}" for k, name in enumerate(FASHION_CLASSES)]


def copy_of(image: np.ndarray, *, copy: int, index: int, seed: int) -> np.ndarray:
    """uint8 (H, W) -> copy `copy` of it: 0 is the image itself; others augment.py's flip_crop (mirror
    with p = 1/2, then shift by up to CROP_PAD pixels with the border repeated), drawn per image from
    (seed, copy, index) in numpy (a torch call per image is ~100x slower)."""
    if copy == 0:
        return image
    rng = np.random.default_rng([seed, copy, index])
    if rng.random() < 0.5:
        image = image[:, ::-1]
    dy, dx = rng.integers(0, 2 * CROP_PAD + 1, size=2)
    h, w = image.shape
    return np.ascontiguousarray(np.pad(image, CROP_PAD, mode="edge")[dy:dy + h, dx:dx + w])


def png_bytes(image: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image, mode="L").save(buf, format="PNG")
    return buf.getvalue()


def _items(x: np.ndarray, copies: int) -> list[tuple[int, int]]:
    return [(i, c) for i in range(len(x)) for c in range(copies)]


def write_folder(out: Path, split: str, x: np.ndarray, y: np.ndarray, *, copies: int, seed: int, bar) -> None:
    names = class_dirs()
    for name in names:
        (out / split / name).mkdir(parents=True)
    for i, c in _items(x, copies):
        data = png_bytes(copy_of(x[i], copy=c, index=i, seed=seed))
        (out / split / names[y[i]] / f"{i:06d}-{c:02d}.png").write_bytes(data)
        bar.update(1)


def write_parquet(out: Path, split: str, x: np.ndarray, y: np.ndarray, *, copies: int, seed: int, bar,
                  rows_per_file: int, row_group: int) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    (out / split).mkdir(parents=True)
    items = _items(x, copies)
    order = np.random.default_rng([seed, len(items)]).permutation(len(items))  # mixed classes per file
    meta = {b"classes": json.dumps(list(FASHION_CLASSES)).encode()}
    for part, start in enumerate(range(0, len(items), rows_per_file)):
        chunk = [items[j] for j in order[start:start + rows_per_file]]
        images = []
        for i, c in chunk:
            images.append(png_bytes(copy_of(x[i], copy=c, index=i, seed=seed)))
            bar.update(1)
        table = pa.table({"image": pa.array(images, pa.binary()),
                          "label": pa.array([int(y[i]) for i, _ in chunk], pa.int64())})
        pq.write_table(table.replace_schema_metadata(meta), out / split / f"part-{part:05d}.parquet",
                       row_group_size=row_group)


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m layerpar.data.make_folder", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", type=Path, help="output directory (must not exist or be empty)")
    p.add_argument("--source", default=FASHION_ROOT, help=f"Fashion-MNIST IDX files (default {FASHION_ROOT})")
    p.add_argument("--format", choices=("folder", "parquet"), default="folder", help="PNG tree or Parquet")
    p.add_argument("--copies", type=int, default=1, help="copies of each training image (1 = as is; 10 for "
                   "the benchmark's 10x: the image and 9 augmented copies)")
    p.add_argument("--limit", type=int, default=0,
                   help="only the first N training and N/6 test images (0 = all 60000 + 10000)")
    p.add_argument("--seed", type=int, default=0, help="seed of the copies' augmentation and the Parquet "
                   "row order")
    p.add_argument("--rows-per-file", type=int, default=10000, help="Parquet rows per file")
    p.add_argument("--row-group", type=int, default=1000, help="Parquet rows per row group")
    args = p.parse_args(argv)
    if args.copies < 1 or args.limit < 0 or args.rows_per_file < 1 or args.row_group < 1:
        p.error("--copies, --rows-per-file and --row-group must be >= 1 and --limit >= 0")
    return args


def main(argv: list[str] | None = None) -> int:
    from tqdm import tqdm

    args = parse(argv)
    out = args.out.expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        print(f"error: {out} exists and is not an empty directory; choose a new output directory",
              file=sys.stderr)
        return 2
    try:
        raw = load_fashion_mnist(args.source)
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    parts = {"train": (raw.x_train[:, 0], raw.y_train, args.copies),
             "test": (raw.x_test[:, 0], raw.y_test, 1)}
    if args.limit:
        parts = {s: (x[:n], y[:n], k) for (s, (x, y, k)), n in
                 zip(parts.items(), (args.limit, max(1, args.limit // 6)), strict=True)}
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)  # a previous interrupted run's
    total = sum(len(x) * k for x, _, k in parts.values())
    with tqdm(total=total, unit="img", desc=f"writing {out}", dynamic_ncols=True) as bar:
        for split, (x, y, copies) in parts.items():
            if args.format == "folder":
                write_folder(partial, split, x, y, copies=copies, seed=args.seed, bar=bar)
            else:
                write_parquet(partial, split, x, y, copies=copies, seed=args.seed, bar=bar,
                              rows_per_file=args.rows_per_file, row_group=args.row_group)
    if out.exists():
        out.rmdir()  # empty, checked above
    os.replace(partial, out)  # complete or absent: never half-written
    print(f"wrote {total} images to {out} ({args.format})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
