"""Training-time augmentation, seeded per batch so a resumed run sees the same images.

    x = augment(x, kind="flip_crop", seed=0, epoch=3, index=17)

- `none`: the batch as it is.
- `flip`: each image mirrored left-right with probability 1/2.
- `flip_crop`: `flip`, then each image shifted by up to `CROP_PAD` pixels in each direction (padded by
  repeating its border, cropped back to its size): the standard "random crop" on small images.
Only training batches are augmented; validation and test images never are.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from layerpar.data.base import seeded_generator

CROP_PAD = 2


def augment(x: torch.Tensor, *, kind: str, seed: int, epoch: int, index: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, C, H, W); the draws depend only on (seed, epoch, index)."""
    if kind == "none":
        return x
    g = seeded_generator(seed, epoch, index, 7)  # 7: apart from the shuffle's (seed, epoch) stream
    b, c, h, w = x.shape
    flip = torch.rand(b, generator=g) < 0.5
    x = torch.where(flip.view(b, 1, 1, 1), x.flip(-1), x)
    if kind == "flip_crop":
        p = CROP_PAD
        padded = F.pad(x, (p, p, p, p), mode="replicate")
        dy, dx = torch.randint(0, 2 * p + 1, (2, b), generator=g)
        rows = (dy.view(b, 1) + torch.arange(h)).view(b, 1, h, 1)
        cols = (dx.view(b, 1) + torch.arange(w)).view(b, 1, 1, w)
        x = padded[torch.arange(b).view(b, 1, 1, 1), torch.arange(c).view(1, c, 1, 1), rows, cols]
    return x.contiguous()
