"""Streaming training data on Ray Data: image folders or Parquet files read, decoded, resized,
normalised and augmented by Ray Data tasks as training consumes them (data.streaming: true).

    catalog = check_dataset(cfg, replicas=R)                 # on the driver: no pixel is decoded
    source = StreamingSource(cfg, "train", replica=r, replicas=R, catalog=catalog)
    for x, y in source.batches(epoch, start_batch):          # x float32 (b, C, H, W), y int64 (b,)
        ...

Who calls it: layerpar/train/feed.StreamingFeed. In a replica group only ONE rank (the branch-group
leader) iterates `batches` and broadcasts each batch to its branch ranks (comm.broadcast_batch); the
other ranks never touch Ray Data.

What a batch is (the in-memory path's, so that results compare):
- train, folder format: epoch e's order is `torch.randperm(n, seeded_generator(seed, e))` over the
  train split, as layerpar/data/base.batches draws it; global batch k is order[k*B:(k+1)*B] and
  replica r gets its `torch.tensor_split(rows, R)[r]` share, as BranchShard.train_step takes it. With
  R = 1 the batches equal the in-memory path's (`batches`, then `augment`) bit for bit.
- train, parquet format: row groups in a seeded order, the rows of each group in a seeded order (a
  row group is the unit of I/O; write the files with rows shuffled, as make_folder does). Batches and
  shares are cut as above.
- augmentation: the draws of layerpar/data/augment.py for batch k of epoch e (seed, e, k), made on the
  driver for the whole batch, so a replica's share is augmented as the in-memory batch's rows are.
- val / test: not shuffled, not augmented; replica r reads the contiguous share
  `torch.tensor_split(rows, R)[r]` (concatenate the replicas' outputs in order for the whole split).
- resume: `batches(e, k)` yields exactly batches k.. of the uninterrupted `batches(e, 0)`.
- normalisation: (x / 255 - mean) / std with the training split's per-channel constants, taken by
  channel_stats over at most data.stats_images evenly spaced images (exact with all of them).

Memory: decoded images live only in the Ray Data blocks in flight (about BLOCK_BYTES each, a few
per decode task); what grows with the dataset is the caller's catalog and one epoch's plan, some
50 bytes an image (file name, indices, label, draws). Files are read in the map_batches task
(Pillow, pyarrow), not with ray.data.read_images / read_parquet: those order rows by their own read
tasks, and this order must be the seeded one.

Needs a running Ray (ray.init, or a Ray Train worker); each decode task takes one CPU of the
cluster, so a training run must leave CPUs free for them (data.read_parallelism caps the tasks).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from layerpar.data.augment import CROP_PAD
from layerpar.data.base import DataError, batches_per_epoch, seeded_generator
from layerpar.data.streaming_catalog import Catalog, Files, channel_stats, check_dataset, read_files

__all__ = ["Catalog", "DataError", "StreamingSource", "apply_draws", "check_dataset"]

SPLITS = ("train", "val", "test")
BLOCK_BYTES, MAX_BLOCK_ROWS = 16 << 20, 2048
"""A Ray Data block (the unit of one decode task) holds about BLOCK_BYTES of decoded float32 images,
at least one batch and at most MAX_BLOCK_ROWS rows: few tasks for small images, bounded memory for
large ones."""
_FILES: dict[str, Files] = {}  # a decode worker's file list, by object ref, fetched once


@dataclass(frozen=True)
class Plan:
    """One epoch's rows for one replica from a start batch on, in order, with their draws."""

    rows: np.ndarray
    """(n,) int64 catalog row ids."""
    flip: np.ndarray
    """(n,) bool."""
    shift: np.ndarray
    """(n, 2) int8: crop offsets (dy, dx) in 0..2*CROP_PAD (CROP_PAD: no shift)."""
    sizes: list[int]
    """Rows of each batch this replica yields."""


def apply_draws(x: torch.Tensor, flip: torch.Tensor, shift: torch.Tensor | None) -> torch.Tensor:
    """layerpar/data/augment.augment with its draws given: (b, C, H, W) mirrored where `flip`, then
    (when `shift` is given) padded by repeating the border and cropped at `shift` (b, 2)."""
    b, c, h, w = x.shape
    x = torch.where(flip.view(b, 1, 1, 1), x.flip(-1), x)
    if shift is not None:
        p = CROP_PAD
        padded = F.pad(x, (p, p, p, p), mode="replicate")
        dy, dx = shift.long().T
        rows = (dy.view(b, 1) + torch.arange(h)).view(b, 1, h, 1)
        cols = (dx.view(b, 1) + torch.arange(w)).view(b, 1, 1, w)
        x = padded[torch.arange(b).view(b, 1, 1, 1), torch.arange(c).view(1, c, 1, 1), rows, cols]
    return x.contiguous()


def _decode(batch: dict, *, files, mean: tuple, std: tuple, crop: bool) -> dict:
    """A Ray Data task: plan rows -> normalised, augmented float32 images and their labels."""
    import ray

    key = files.hex()
    if key not in _FILES:
        _FILES.clear()  # one source at a time per worker: bounded
        _FILES[key] = ray.get(files)
    x = torch.from_numpy(read_files(_FILES[key], batch["file"], batch["in_file"]).astype(np.float32))
    shape = (1, len(mean), 1, 1)  # the same float32 operations as base.to_split
    x.mul_(1 / 255).sub_(torch.tensor(mean).view(shape)).div_(torch.tensor(std).view(shape))
    shift = torch.from_numpy(np.stack([batch["dy"], batch["dx"]], axis=1))
    x = apply_draws(x, torch.from_numpy(batch["flip"]), shift if crop else None)
    return {"seq": batch["seq"], "x": x.numpy(), "y": batch["label"]}


def _data_error(exc: BaseException) -> DataError | None:
    """The DataError a decode task raised, however Ray wrapped it (as a cause, or only as the text of
    the remote traceback, which is what RayTaskError(UserCodeException) carries)."""
    seen, top = set(), exc
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, DataError):
            return exc
        exc = getattr(exc, "cause", None) or exc.__cause__ or exc.__context__
    found = re.search(r"DataError: ([^\n]+)", str(top))
    return DataError(found.group(1)) if found else None


class StreamingSource:
    """One split of a streamed dataset as replica `replica` of `replicas` reads it (see the module)."""

    def __init__(self, cfg, split: str = "train", replica: int = 0, replicas: int = 1, *,
                 catalog: Catalog | None = None, stats: tuple[tuple, tuple] | None = None):
        if split not in SPLITS:
            raise ValueError(f"split {split!r} must be one of {', '.join(SPLITS)}")
        if not 0 <= replica < replicas:
            raise ValueError(f"replica ({replica}) must be in 0..{replicas - 1}")
        self.catalog = catalog if catalog is not None else check_dataset(cfg, replicas)
        if stats is None:  # the driver may pass the constants it took once
            stats = channel_stats(self.catalog, cfg.data.stats_images)
        self.mean, self.std = stats
        self.split, self.replica, self.replicas = split, replica, replicas
        self.batch_size, self.seed = cfg.train.batch_size, cfg.data.seed
        self.augment = cfg.data.augment if split == "train" else "none"
        self.parallelism = cfg.data.read_parallelism
        self._ref = None

    @property
    def num_rows(self) -> int:
        """Rows of the whole split (all replicas)."""
        return len(self.catalog.rows[self.split])

    def batches_per_epoch(self) -> int:
        """Batches `batches(epoch)` yields (the same for every replica on train)."""
        if self.split == "train":
            return batches_per_epoch(self.num_rows, self.batch_size)
        share = len(np.array_split(np.arange(self.num_rows), self.replicas)[self.replica])
        return -(-share // self.batch_size)

    def _order(self, epoch: int) -> np.ndarray:
        rows = self.catalog.rows["train"]
        g = seeded_generator(self.seed, epoch)
        if self.catalog.format == "folder":  # base.batches' order
            return rows[torch.randperm(len(rows), generator=g).numpy()]
        cat = self.catalog
        files, group = cat.file_of[rows], np.zeros(len(rows), np.int64)
        for f in np.unique(files):  # the row group of every row, one file at a time
            at = files == f
            group[at] = np.searchsorted(cat.group_starts[int(f)], cat.row_in_file[rows[at]], side="right") - 1
        unit = files.astype(np.int64) * (int(group.max()) + 1) + group  # (file, group)
        units, unit_id = np.unique(unit, return_inverse=True)
        unit_rank = torch.randperm(len(units), generator=g).argsort().numpy()  # seeded group order
        within = torch.randperm(len(rows), generator=g).numpy()  # seeded order inside each group
        return rows[np.lexsort((within, unit_rank[unit_id]))]

    def plan(self, epoch: int, start_batch: int = 0) -> Plan:
        """The rows and draws `batches(epoch, start_batch)` reads, computed on the caller."""
        b, r, parts = self.batch_size, self.replica, []
        if self.split != "train":
            mine = np.array_split(self.catalog.rows[self.split], self.replicas)[r][start_batch * b:]
            sizes = [len(c) for c in np.array_split(mine, range(b, len(mine), b))] if len(mine) else []
            return Plan(mine, np.zeros(len(mine), bool), np.full((len(mine), 2), CROP_PAD, np.int8), sizes)
        order = self._order(epoch)
        for k in range(start_batch, self.batches_per_epoch()):
            rows = order[k * b:(k + 1) * b]
            share = np.array_split(np.arange(len(rows)), self.replicas)[r]  # = torch.tensor_split
            flip = np.zeros(len(rows), bool)
            shift = np.full((len(rows), 2), CROP_PAD, np.int8)
            if self.augment != "none":  # augment.augment's draws for batch k, in its order
                g = seeded_generator(self.seed, epoch, k, 7)
                flip = (torch.rand(len(rows), generator=g) < 0.5).numpy()
                if self.augment == "flip_crop":
                    shift = torch.randint(0, 2 * CROP_PAD + 1, (2, len(rows)), generator=g).T.numpy()
            parts.append((rows[share], flip[share], shift[share].astype(np.int8)))
        if not parts:
            return Plan(np.zeros(0, np.int64), np.zeros(0, bool), np.zeros((0, 2), np.int8), [])
        rows, flip, shift = (np.concatenate(p) for p in zip(*parts, strict=True))
        return Plan(rows, flip, shift, [len(p[0]) for p in parts])

    def batches(self, epoch: int, start_batch: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(x float32 (b, C, H, W), y int64 (b,)) of this replica, batch start_batch on; a DataError
        names an unreadable file. Stopping early: close the iterator (or drop it) to stop the reads."""
        plan = self.plan(epoch, start_batch)
        if not plan.sizes:
            return
        stream = self._stream(plan)
        try:
            yield from self._cut(stream, plan.sizes)
        except DataError:
            raise
        except Exception as exc:
            err = _data_error(exc)
            if err is None:
                raise
            raise DataError(str(err)) from None
        finally:  # a consumer that stops early (a break, an error) stops Ray Data's execution now
            stream.close()

    def _stream(self, plan: Plan) -> Iterator[dict]:
        import pyarrow as pa
        import ray
        import ray.data

        if self._ref is None:
            self._ref = ray.put(self.catalog.reader())  # once per source; each decode worker gets it once
        cat = self.catalog
        rows = plan.rows  # each row carries what its task needs: file, place in it, label, draws
        table = pa.table({"seq": np.arange(len(rows), dtype=np.int32), "file": cat.file_of[rows],
                          "in_file": cat.row_in_file[rows], "label": cat.labels[rows], "flip": plan.flip,
                          "dy": plan.shift[:, 0], "dx": plan.shift[:, 1]})
        step = max(self.batch_size, min(MAX_BLOCK_ROWS, BLOCK_BYTES // (4 * cat.channels * cat.side ** 2)))
        ds = ray.data.from_arrow([table.slice(i, step) for i in range(0, len(table), step)])
        ds = ds.map_batches(_decode, batch_size=None, batch_format="numpy",
                            compute=ray.data.TaskPoolStrategy(size=self.parallelism or None),
                            fn_kwargs={"files": self._ref, "mean": self.mean, "std": self.std,
                                       "crop": self.augment == "flip_crop"})
        ds.context.execution_options.preserve_order = True  # the plan's order is the batch order
        ds.context.enable_progress_bars = False  # the training loop shows its own
        logging.getLogger("ray.data").setLevel(logging.WARNING)  # no lines per epoch over the bar
        yield from ds.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=2)

    @staticmethod
    def _cut(blocks: Iterator[dict], sizes: list[int]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Decoded blocks -> batches of the planned sizes; a row out of the plan's order is an error."""
        xs, ys, have, expect, i = [], [], 0, 0, 0
        for block in blocks:
            seq = block["seq"]
            if len(seq) and (seq[0] != expect or np.any(np.diff(seq) != 1)):
                raise RuntimeError(f"Ray Data returned rows out of order (row {seq[0]}, expected {expect})")
            expect += len(seq)
            xs.append(block["x"])
            ys.append(block["y"])
            have += len(seq)
            while i < len(sizes) and have >= sizes[i]:
                x, y = np.concatenate(xs), np.concatenate(ys)
                n = sizes[i]
                yield torch.from_numpy(np.ascontiguousarray(x[:n])), torch.from_numpy(y[:n].astype(np.int64))
                xs, ys, have, i = [x[n:]], [y[n:]], have - n, i + 1
