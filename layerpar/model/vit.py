"""The serial baseline: a ViT made of the same blocks stacked num_branches * branch_depth deep."""

from __future__ import annotations

import torch
from torch import nn

from layerpar.model.blocks import make_block
from layerpar.model.layers import pool, seeded, torch_dtype
from layerpar.model.paraformer import BRANCH_TAG, make_embed, make_head


class ViT(nn.Module):
    def __init__(self, cfg, *, seed: int = 0, depth: int | None = None):
        super().__init__()
        self.cfg = cfg
        depth = cfg.num_blocks if depth is None else depth
        g = seeded(seed, BRANCH_TAG, 0)
        self.embed = make_embed(cfg, seed)
        self.blocks = nn.ModuleList([make_block(cfg, g) for _ in range(depth)])
        self.head = make_head(cfg, seed)
        self.to(torch_dtype(cfg))  # initialised in float32 first: the same draws in either dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, classes)
        h = self.embed(x)  # (B, T, D)
        last = len(self.blocks) - 1
        for i, block in enumerate(self.blocks):  # each block waits for the one before it
            # CLS pooling reads one row: the last block computes only that row (same output).
            h = block(h, cls_only=self.cfg.pool == "cls" and i == last)
        return self.head(pool(h, self.cfg.pool))
