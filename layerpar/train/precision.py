"""Mixed precision (train.precision): torch.autocast on the rank's device, and for float16 a loss
scale. Master weights and the optimizer state stay float32 (autocast casts copies for the matmuls);
the branch rows leave a rank as float32, so every reduction between ranks adds float32 numbers.

    with autocast(cfg.train.precision, device): rows = model.branch_outputs(x0, ids)
    scale = LossScale.for_precision(cfg.train.precision)     # None unless float16
"""

from __future__ import annotations

import contextlib

import torch

HALF = {"bfloat16": torch.bfloat16, "float16": torch.float16}


def autocast(precision: str, device: torch.device | str):
    """The autocast context of `precision` on `device` (a no-op for float32)."""
    if precision not in HALF:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=HALF[precision])


def wide(t: torch.Tensor) -> torch.Tensor:
    """A half-precision tensor as float32 (what crosses between ranks); others unchanged."""
    return t.float() if t.dtype in (torch.bfloat16, torch.float16) else t


class LossScale:
    """A dynamic loss scale for float16, as torch.amp.GradScaler keeps it, but decided from the
    global gradient norm that every rank already holds (the same number on every rank): a step with
    an inf/NaN norm is skipped on every rank and the scale halves; it doubles after `interval` good
    steps. The scale is not checkpointed: a resumed float16 run starts again at 2**16."""

    def __init__(self, init: float = 2.0 ** 16, interval: int = 2000) -> None:
        self.scale, self.interval, self.good = init, interval, 0

    @classmethod
    def for_precision(cls, precision: str) -> LossScale | None:
        return cls() if precision == "float16" else None

    def update(self, finite: bool) -> bool:
        """After a step's gradients are unscaled: whether to take the optimizer step."""
        if not finite:
            self.scale, self.good = self.scale / 2.0, 0
            return False
        self.good += 1
        if self.good >= self.interval:
            self.scale, self.good = self.scale * 2.0, 0
        return True
