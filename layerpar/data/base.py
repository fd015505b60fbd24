"""What every dataset becomes: Split / Splits of normalised float32 tensors, and deterministic batches.

Images stay at their native size in memory; a Split whose `size` differs from it is resized per batch
(bilinear), so CIFAR at 224x224 costs one batch of memory, not 30 GB.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F


class DataError(Exception):
    """A dataset is missing, malformed or does not fit the model; the message says what to do."""


@dataclass(frozen=True)
class Split:
    x: torch.Tensor
    """(N, C, H, W) float32, normalised per channel, at the dataset's native size."""
    y: torch.Tensor
    """(N,) int64 class ids."""
    size: int | None = None
    """Side the images are resized to when taken (None: native size)."""

    def __len__(self) -> int:
        return len(self.y)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of the images `take` and `batches` yield."""
        c, h, w = self.x.shape[1:]
        return (c, self.size, self.size) if self.size else (c, h, w)

    def take(self, index: torch.Tensor | slice) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows `index` as (x (B, C, H', W') float32 at the model's size, y (B,) int64)."""
        x, y = self.x[index], self.y[index]
        if self.size and x.shape[-2:] != (self.size, self.size):
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False)
        return x.contiguous(), y


@dataclass(frozen=True)
class Splits:
    train: Split
    val: Split
    test: Split
    classes: list[str]
    """Class names, indexed by label."""
    image_shape: tuple[int, int, int]
    """(C, H, W) of the batches the model sees (after any resize)."""


def seeded_generator(*parts: int) -> torch.Generator:
    """A generator seeded by mixing `parts` (e.g. seed, epoch, batch) into one 64-bit seed: any
    change in any part gives an unrelated stream."""
    mixed = int(np.random.SeedSequence(list(parts)).generate_state(1, np.uint64)[0])
    return torch.Generator().manual_seed(mixed)


def batches_per_epoch(num_train: int, batch_size: int) -> int:
    """Batches in one pass over num_train examples (the last one may be short)."""
    return max(1, -(-num_train // batch_size))


def batches(split: Split, batch_size: int, *, seed: int, epoch: int, shuffle: bool = True,
            drop_last: bool = False, skip: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield (x (B, C, H, W), y (B,)) over the split; the order depends only on (seed, epoch).

    skip: leave out the first `skip` batches of this order without building them (mid-epoch resume).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size ({batch_size}) must be >= 1")
    n = len(split)
    if shuffle:  # neighbouring epochs get unrelated orders
        order = torch.randperm(n, generator=seeded_generator(seed, epoch))
    else:
        order = torch.arange(n)
    stop = n - n % batch_size if drop_last else n
    for start in range(skip * batch_size, stop, batch_size):
        yield split.take(order[start:start + batch_size])


# ----------------------------------------------------------------------------- helpers for the loaders


@dataclass
class Raw:
    """A dataset as its loader reads it: images (N, C, H, W) before normalisation, and a test split."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    classes: list[str]
    scale: float
    """Multiplier to [0, 1] (1/255 for bytes)."""
    mean: tuple[float, ...]
    """Per-channel mean after scaling (fixed constants, not recomputed)."""
    std: tuple[float, ...]


def stratified_split(y: np.ndarray, fraction: float, seed: int, salt: int = 0
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Indices (keep, held), each sorted; round(fraction * n_c) of every class c is held out."""
    rng = np.random.default_rng([seed, salt])
    keep, held = [], []
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        k = int(round(fraction * len(idx)))
        held.append(idx[:k])
        keep.append(idx[k:])
    return np.sort(np.concatenate(keep)), np.sort(np.concatenate(held))


def limit_rows(rows: np.ndarray, n: int, seed: int) -> np.ndarray:
    """data.limit_train: a seeded random n of `rows`, kept in order (n <= 0 or n >= len: all of them).
    Every class keeps its share whatever order the source lists samples in (an image folder lists
    them class by class: its first n would be a few classes only)."""
    if n <= 0 or n >= len(rows):
        return rows
    return np.sort(np.random.default_rng([seed, 3]).choice(rows, n, replace=False))


def to_split(x: np.ndarray, y: np.ndarray, *, scale: float, mean: tuple[float, ...],
             std: tuple[float, ...], size: int | None) -> Split:
    """uint8 (or float) images (N, C, H, W) -> normalised float32 Split: (x * scale - mean) / std."""
    xt = torch.from_numpy(np.array(x, dtype=np.float32))  # a writable copy, normalised in place
    xt.mul_(scale)
    shape = (1, len(mean), 1, 1)
    xt.sub_(torch.tensor(mean).view(shape)).div_(torch.tensor(std).view(shape))
    return Split(xt, torch.from_numpy(np.array(y, dtype=np.int64)), size)
