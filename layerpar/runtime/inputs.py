"""What the Engine accepts from a caller: a float32 batch shaped for the model, and a prefix size.

    x = check_input(cfg.model, x)         # detached, contiguous, on the CPU; else one ValueError
    k = prefix_size(cfg.model, None)      # N; an integer in 1..N, else one ValueError
"""

from __future__ import annotations

import operator

import torch


def check_input(m, x) -> torch.Tensor:
    """A float32 (B, C, H, W) batch shaped for the model, or a ValueError saying what was expected."""
    want = f"float32 tensor of shape (B, {m.in_channels}, {m.image_size}, {m.image_size})"
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"input must be a {want}, got {type(x).__name__}")
    if x.dtype != torch.float32:
        raise ValueError(f"input must be a {want}, got dtype {x.dtype}")
    if x.dim() != 4 or tuple(x.shape[1:]) != (m.in_channels, m.image_size, m.image_size) \
            or x.shape[0] < 1:
        raise ValueError(f"input must be a {want}, got shape {tuple(x.shape)}")
    return x.detach().cpu().contiguous()


def prefix_size(m, num_branches) -> int:
    """num_branches as the prefix size k in 1..N (None: N), or a ValueError."""
    n = m.num_branches
    if num_branches is None:
        return n
    try:
        if isinstance(num_branches, bool):
            raise TypeError
        k = operator.index(num_branches)  # int, numpy or 0-d torch integers
    except TypeError:
        raise ValueError(f"num_branches must be an integer in 1..{n}, got {num_branches!r}") from None
    if not 1 <= k <= n:
        raise ValueError(f"num_branches ({k}) must be in 1..{n}")
    return k
