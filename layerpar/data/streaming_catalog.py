"""What a streamed dataset holds, read from directory listings and Parquet metadata, never its pixels.

    catalog = check_dataset(cfg, replicas=2)        # DataError (one sentence) if it cannot train
    catalog.rows["train"], catalog.classes           # row ids of each split, class names
    mean, std = channel_stats(catalog, cfg)          # decodes an evenly spaced sample only

A row is one image: for image folders one file, for Parquet one row of one file. The splits are the
in-memory path's (layerpar/data/folder.py and load_dataset): train is ROOT/train (less a stratified
20% test share, salt 1, when ROOT/test is absent), val a stratified data.val_fraction of it (salt 2),
then data.limit_train. Layouts:

    folder:  ROOT/train/<class>/*.png|jpg|...   ROOT/test/<class>/...   (classes: sorted folder names)
    parquet: ROOT/train/*.parquet   ROOT/test/*.parquet   columns `image` (encoded bytes) and `label`
             (int, 0..K-1); class names from the schema metadata key `classes` (a JSON list) or
             the label values themselves.
"""

from __future__ import annotations

import io
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from layerpar.data.base import DataError, limit_rows, stratified_split
from layerpar.data.folder import SUFFIXES, TEST_FRACTION

IMAGE_COLUMN, LABEL_COLUMN = "image", "label"
EXACT_STATS_BYTES = 64 << 20
"""A stats sample up to this size (as float64) is reduced in one numpy call: the in-memory path's
constants to the last bit; a larger one is summed in chunks."""


@dataclass(frozen=True)
class Files:
    """What a decode task needs to read rows (shipped to Ray Data workers once per source)."""

    root: Path
    format: str
    """folder or parquet."""
    mode: str
    """Pillow mode the images are converted to: L (1 channel) or RGB (3)."""
    side: int
    """model.image_size: every image is resized to side x side."""
    dirs: tuple[str, ...]
    """Directories under root that hold the files (train/<class>, test/<class>; train, test)."""
    dir_of: np.ndarray
    """(F,) int16 index into dirs of each file."""
    files: np.ndarray
    """(F,) file names, as bytes (a few bytes an image, no Python object each)."""
    group_starts: dict[int, np.ndarray]
    """Parquet only: file index -> first row of each row group (the reader's unit of I/O)."""

    @property
    def channels(self) -> int:
        return 1 if self.mode == "L" else 3

    def path(self, f: int) -> str:
        return os.path.join(self.root, self.dirs[self.dir_of[f]], os.fsdecode(self.files[f]))


@dataclass(frozen=True)
class Catalog:
    """Every row of the dataset as (file, row in file, label), and the row ids of each split."""

    root: Path
    format: str
    """folder or parquet."""
    classes: list[str]
    mode: str
    """Pillow mode the images are converted to: L (1 channel) or RGB (3)."""
    side: int
    """model.image_size: every image is resized to side x side."""
    dirs: tuple[str, ...]
    """Directories under root that hold the files (train/<class>, test/<class>; train, test)."""
    dir_of: np.ndarray
    """(F,) int16 index into dirs of each file."""
    files: np.ndarray
    """(F,) file names, as bytes (a few bytes an image, no Python object each)."""
    file_of: np.ndarray
    """(N,) int32 index into files of each row."""
    row_in_file: np.ndarray
    """(N,) int32 row inside its Parquet file (0 for an image file)."""
    labels: np.ndarray
    """(N,) int64."""
    group_starts: dict[int, np.ndarray]
    """Parquet only: file index -> first row of each row group (the reader's unit of I/O)."""
    rows: dict[str, np.ndarray]
    """train / val / test -> int64 row ids, in the in-memory path's order."""
    stats_rows: np.ndarray
    """The rows the in-memory path takes the normalisation mean and std over (train before val)."""

    @property
    def channels(self) -> int:
        return 1 if self.mode == "L" else 3

    def reader(self) -> Files:
        return Files(self.root, self.format, self.mode, self.side, self.dirs, self.dir_of, self.files,
                     self.group_starts)


def _fail(msg: str) -> DataError:
    return DataError(msg)


def _class_dirs(tree: Path) -> list[str]:
    return sorted(p.name for p in tree.iterdir() if p.is_dir() and not p.name.startswith("."))


def _list_folder(tree: Path, classes: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """File names (bytes) and labels (= the class folder) of tree/<class>/*, sorted as folder.py
    reads them; an empty class folder is an error."""
    paths, labels = [], []
    for label, name in enumerate(classes):
        with os.scandir(tree / name) as it:
            names = sorted(e.name for e in it if e.is_file() and Path(e.name).suffix.lower() in SUFFIXES)
        if not names:
            raise _fail(f"class folder {tree / name} holds no images ({', '.join(SUFFIXES)}); "
                        "remove it or add its images")
        paths.append(np.asarray([os.fsencode(n) for n in names]))
        labels.append(np.full(len(names), label, np.int64))
    return np.concatenate(paths), np.concatenate(labels)


def _list_parquet(tree: Path) -> tuple[list[str], list[np.ndarray], list[np.ndarray], list[str] | None]:
    """Files, each file's labels (the label column only) and row-group starts, and the classes named
    in the schema metadata (None if absent)."""
    import pyarrow.parquet as pq

    files = sorted(str(p) for p in tree.glob("*.parquet"))
    if not files:
        raise _fail(f"{tree} holds no *.parquet files (expected columns {IMAGE_COLUMN!r} and "
                    f"{LABEL_COLUMN!r})")
    labels, starts, names = [], [], None
    for f in files:
        try:
            meta = pq.ParquetFile(f)
            schema = meta.schema_arrow
        except Exception as exc:  # noqa: BLE001 - pyarrow raises several kinds for a damaged file
            raise _fail(f"{f} is not a readable Parquet file ({exc})") from None
        for col in (IMAGE_COLUMN, LABEL_COLUMN):
            if col not in schema.names:
                raise _fail(f"{f} has no {col!r} column (it has {', '.join(schema.names)}); a streamed "
                            f"Parquet dataset needs {IMAGE_COLUMN!r} (encoded bytes) and {LABEL_COLUMN!r}")
        col = meta.read(columns=[LABEL_COLUMN]).column(0)  # the label column only, no image bytes
        if col.null_count or not str(col.type).startswith(("int", "uint")):
            raise _fail(f"{f}: column {LABEL_COLUMN!r} must hold integer class ids without nulls, "
                        f"found {col.type}")
        labels.append(col.to_numpy().astype(np.int64))
        sizes = [meta.metadata.row_group(g).num_rows for g in range(meta.num_row_groups)]
        starts.append(np.cumsum([0] + sizes[:-1]).astype(np.int64))
        if names is None and schema.metadata and b"classes" in schema.metadata:
            names = [str(c) for c in json.loads(schema.metadata[b"classes"])]
    return files, labels, starts, names


def _read_tree(base: Path, fmt: str, split: str, classes: list[str] | None):
    """(dirs, dir_of, files, file_of, row_in_file, labels, group_starts, classes) of ROOT/split."""
    tree = base / split
    if fmt == "folder":
        found = _class_dirs(tree)
        if classes is None:
            if len(found) < 2:
                raise _fail(f"{tree} must hold at least 2 class folders, found {len(found)}")
            classes = found
        elif found != classes:
            raise _fail(f"{tree} has classes {found} but {base / 'train'} has {classes}; they must match")
        names, labels = _list_folder(tree, classes)
        n, dirs = len(names), [f"{split}/{c}" for c in classes]
        return (dirs, labels.astype(np.int16), names, np.arange(n, dtype=np.int32), np.zeros(n, np.int32),
                labels, {}, classes)
    files, per_file, starts, names = _list_parquet(tree)
    labels = np.concatenate(per_file)
    if classes is None:
        k = int(labels.max()) + 1 if len(labels) else 0
        classes = names if names is not None else [str(c) for c in range(k)]
        if len(classes) < 2:
            raise _fail(f"{tree}: column {LABEL_COLUMN!r} must hold at least 2 classes, found {len(classes)}")
    bad = labels[(labels < 0) | (labels >= len(classes))]
    if len(bad):
        raise _fail(f"{tree}: label {int(bad[0])} is outside 0..{len(classes) - 1} ({len(classes)} classes)")
    empty = np.flatnonzero(np.bincount(labels, minlength=len(classes)) == 0)
    if len(empty):
        raise _fail(f"{tree}: class {classes[empty[0]]!r} (label {int(empty[0])}) has no rows; every class "
                    "needs images in every split")
    names = np.asarray([os.fsencode(Path(f).name) for f in files])
    file_of = np.concatenate([np.full(len(v), i, np.int32) for i, v in enumerate(per_file)])
    row_in_file = np.concatenate([np.arange(len(v), dtype=np.int32) for v in per_file])
    return ([split], np.zeros(len(names), np.int16), names, file_of, row_in_file, labels,
            dict(enumerate(starts)), classes)


def check_dataset(cfg, replicas: int = 1) -> Catalog:
    """The dataset at cfg.data.root described without decoding it: it exists, its classes fit the
    model, and every split holds at least one batch (train) or one row (val, test) per replica."""
    d, m, batch = cfg.data, cfg.model, cfg.train.batch_size
    if not d.root:
        raise _fail("data.streaming needs data.root: a directory with train/<class>/ image folders or "
                    "train/*.parquet files")
    base = Path(d.root).expanduser()
    if not (base / "train").is_dir():
        raise _fail(f"data.root {base} not found or has no train/ directory (data.format={d.format})")
    if m.in_channels not in (1, 3):
        raise _fail(f"model.in_channels ({m.in_channels}) must be 1 (grey) or 3 (RGB) for streamed images")
    dirs, dir_of, files, file_of, row_in_file, labels, starts, classes = _read_tree(base, d.format, "train",
                                                                                    None)
    if len(classes) != m.num_classes:
        raise _fail(f"{base} has {len(classes)} classes but model.num_classes is {m.num_classes}; set "
                    f"model.num_classes={len(classes)}")
    n_train_tree = len(labels)
    if (base / "test").is_dir():
        t_dirs, t_dir_of, t_files, t_file_of, t_row, t_labels, t_starts, _ = _read_tree(base, d.format,
                                                                                         "test", classes)
        shift = len(files)
        dir_of = np.concatenate([dir_of, t_dir_of + len(dirs)]).astype(np.int16)
        dirs = dirs + t_dirs
        files = np.concatenate([files, t_files])
        file_of = np.concatenate([file_of, t_file_of + shift])
        row_in_file = np.concatenate([row_in_file, t_row])
        labels = np.concatenate([labels, t_labels])
        starts = {**starts, **{f + shift: s for f, s in t_starts.items()}}
        base_rows = np.arange(n_train_tree)
        test = np.arange(n_train_tree, len(labels))
    else:
        base_rows, test = stratified_split(labels, TEST_FRACTION, d.seed, salt=1)
    train, val = stratified_split(labels[base_rows], d.val_fraction, d.seed, salt=2)
    train, val = base_rows[train], base_rows[val]
    train = limit_rows(train, d.limit_train, d.seed)
    if len(train) < batch:
        raise _fail(f"{base}: the train split has {len(train)} images, fewer than one batch "
                    f"(train.batch_size={batch}) for the {replicas} replica(s) to share; add images or "
                    "lower train.batch_size")
    for name, rows in (("val", val), ("test", test)):
        if len(rows) < replicas and (name == "test" or d.val_fraction > 0):
            raise _fail(f"{base}: the {name} split has {len(rows)} images, fewer than one per replica "
                        f"(parallel.replicas={replicas}); add images or lower parallel.replicas")
    mode = "L" if m.in_channels == 1 else "RGB"
    return Catalog(root=base, format=d.format, classes=list(classes), mode=mode, side=m.image_size,
                   dirs=tuple(dirs), dir_of=dir_of, files=files,
                   file_of=file_of, row_in_file=row_in_file, labels=labels, group_starts=starts,
                   rows={"train": train, "val": val, "test": test}, stats_rows=np.asarray(base_rows))


# ----------------------------------------------------------------------------- decoding


def decode_image(data: bytes | str, *, mode: str, side: int, name: str) -> np.ndarray:
    """One encoded image (bytes, or a path) -> uint8 (C, side, side), as folder.py decodes it."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data) if isinstance(data, bytes) else data) as img:
            arr = np.asarray(img.convert(mode).resize((side, side), Image.Resampling.BILINEAR), np.uint8)
    except (OSError, UnidentifiedImageError, ValueError) as exc:
        raise DataError(f"{name} is not a readable image ({exc})") from None
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)


def read_rows(catalog: Catalog, rows: np.ndarray) -> np.ndarray:
    """Rows -> uint8 (n, C, side, side), in the given order."""
    return read_files(catalog.reader(), catalog.file_of[rows], catalog.row_in_file[rows])


def read_files(catalog: Files, files: np.ndarray, in_file: np.ndarray) -> np.ndarray:
    """Rows given as (file index, row in file) -> uint8 (n, C, side, side), in the given order; a
    Parquet row group is read once per call."""
    import pyarrow.parquet as pq

    out = np.empty((len(files), catalog.channels, catalog.side, catalog.side), np.uint8)
    if catalog.format == "folder":  # one file per row
        for i, f in enumerate(files):
            path = catalog.path(f)
            out[i] = decode_image(path, mode=catalog.mode, side=catalog.side, name=path)
        return out
    for f in np.unique(files):
        path = catalog.path(f)
        at = np.flatnonzero(files == f)
        within = in_file[at]
        starts = catalog.group_starts[int(f)]
        groups = np.searchsorted(starts, within, side="right") - 1
        pf = pq.ParquetFile(path)
        for g in np.unique(groups):
            column = pf.read_row_group(int(g), columns=[IMAGE_COLUMN]).column(0)
            for i, r in zip(at[groups == g], within[groups == g] - starts[g], strict=True):
                out[i] = decode_image(column[int(r)].as_py(), mode=catalog.mode, side=catalog.side,
                                      name=f"{path} row {int(starts[g] + r)}")
    return out


def channel_stats(catalog: Catalog, limit: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel (mean, std) of the scaled [0, 1] training images over at most `limit` evenly spaced
    rows; with limit >= the rows, the in-memory path's constants exactly."""
    rows = catalog.stats_rows
    if len(rows) > limit:
        rows = rows[np.unique(np.linspace(0, len(rows) - 1, limit).round().astype(np.int64))]
    per_image = catalog.channels * catalog.side ** 2 * 8
    if len(rows) * per_image <= EXACT_STATS_BYTES:  # one reduction, as folder.py does it
        scaled = read_rows(catalog, rows).astype(np.float64) / 255.0
        mean, std = scaled.mean(axis=(0, 2, 3)), scaled.std(axis=(0, 2, 3))
    else:
        total, sq, count = 0.0, 0.0, 0
        for part in np.array_split(rows, -(-len(rows) * per_image // EXACT_STATS_BYTES)):
            scaled = read_rows(catalog, part).astype(np.float64) / 255.0
            total = total + scaled.sum(axis=(0, 2, 3))
            sq = sq + (scaled ** 2).sum(axis=(0, 2, 3))
            count += scaled.size // catalog.channels
        mean = total / count
        std = np.sqrt(np.maximum(sq / count - mean ** 2, 0.0))
    return tuple(float(v) for v in mean), tuple(max(1e-3, float(v)) for v in std)
