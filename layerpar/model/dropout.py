"""Dropout masks that depend only on what they drop, never on where it runs.

A run seeds every process alike, so drawing masks from torch's global generator would give every
worker, and every replica of a training mesh, the same stream: branch 3 on worker 1 would drop what
branch 0 drops in one process, and two replicas would drop the same pattern on different rows. A
`DropoutDraw` instead draws each mask from its own stream, named by (seed, optimizer step, branch id,
block, site), for the whole batch, and hands a forward only its rows: so distributed == one process
with dropout too, whatever the layout, the fused stack's batching or the replica split.

    draw = DropoutDraw(seed=0, step=12, row_start=5, total_rows=10)   # replica 1 of 2 of a 10-row batch
    model.branch_outputs(x0, ids, draw=draw)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from layerpar.model.layers import seeded

DROPOUT_TAG = 4  # beside paraformer.py's EMBED_TAG, HEAD_TAG, BRANCH_TAG
ATTENTION, MLP = 0, 1  # the dropout sites of a block

# keep-mask of one site for a tensor of this shape (bool, CPU); (K, B, ...) when stacked over branches
SiteMask = Callable[[int, torch.Size], torch.Tensor]


@dataclass(frozen=True)
class DropoutDraw:
    """Where one training forward's masks come from. The forward sees rows [row_start, row_start + B)
    of a batch of total_rows rows (None: B, the whole batch)."""

    seed: int
    step: int
    p: float
    row_start: int = 0
    total_rows: int | None = None

    def keep(self, branch_id: int, block: int, site: int, shape: Sequence[int]) -> torch.Tensor:
        """The keep-mask (bool, CPU) of one branch's block and site for this forward's rows;
        shape (B, ...) as the tensor dropped."""
        rows = shape[0]
        total = rows if self.total_rows is None else self.total_rows
        g = seeded(self.seed, DROPOUT_TAG, self.step, branch_id, block, site)
        u = torch.rand((total, *shape[1:]), generator=g)  # the whole batch: rows do not move draws
        return u[self.row_start:self.row_start + rows] >= self.p

    def sites(self, branch_ids: Sequence[int], block: int, *, stacked: bool) -> SiteMask:
        """The masks of block `block` of these branches: for a tensor (K, B, ...) stacked over the
        branches, or (B, ...) of the one branch."""
        ids = list(branch_ids)

        def mask(site: int, shape: torch.Size) -> torch.Tensor:
            if not stacked:
                return self.keep(ids[0], block, site, shape)
            return torch.stack([self.keep(b, block, site, shape[1:]) for b in ids])

        return mask


def drop(t: torch.Tensor, p: float, training: bool, site: int, masks: SiteMask | None) -> torch.Tensor:
    """Dropout of one site: from `masks` when given, else torch's (global generator)."""
    if not training or p == 0.0:
        return t
    if masks is None:
        return torch.nn.functional.dropout(t, p, True)
    return t * masks(site, t.shape).to(device=t.device, dtype=t.dtype) / (1.0 - p)
