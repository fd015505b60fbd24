"""The Backend protocol: what the server, the evaluator, the training loop and the CLI ask of a model,
whether it runs in this process (layerpar.train.local.LocalBackend) or across Ray branch workers
(layerpar.runtime.Engine), or across several groups of them (layerpar.runtime.replicas.ReplicaSet). All
implement it; `make_backend` picks one from the config.

    with make_backend(cfg) as backend:                 # LocalBackend when parallel.workers == 0
        logits = backend.infer(x)                      # (B, classes)
        logits, meta = backend.infer_with_meta(x, 3)   # meta: degraded, branches_used
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch

from layerpar.train.local import LocalBackend


@runtime_checkable
class Backend(Protocol):
    def infer(self, x: torch.Tensor, num_branches: int | None = None) -> torch.Tensor:
        """Logits (B, classes) of the prefix model of the first num_branches (default all); raises
        InputOverflow (a ValueError) for rows the model overflows on."""

    def infer_with_meta(self, x: torch.Tensor, num_branches: int | None = None
                        ) -> tuple[torch.Tensor, dict]:
        """(logits as computed, {"degraded": bool, "branches_used": [...]})."""

    def prefix_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of every prefix model k = 1..N: (N, B, classes)."""

    def evaluate(self, split, batch_size: int = 256) -> dict:
        """Accuracy and loss of the full model, and the accuracy of every prefix."""

    def state_dict(self) -> dict[str, torch.Tensor]: ...

    def save(self, path: str | Path, *, epoch: int, extra: dict[str, Any] | None = None) -> Path: ...

    def load(self, path: str | Path, *, weights_only: bool = False) -> dict[str, Any]: ...

    def info(self) -> dict[str, Any]: ...

    def shutdown(self) -> None: ...


def make_backend(cfg, total_steps: int = 0, checkpoint: str | Path | None = None) -> Backend:
    """Engine (Ray branch workers) when cfg.parallel.workers >= 1, a ReplicaSet of such engines when
    cfg.parallel.replicas > 1 too, else a LocalBackend."""
    if cfg.parallel.workers >= 1 and cfg.parallel.replicas > 1:
        from layerpar.runtime.replicas import ReplicaSet

        return ReplicaSet(cfg, total_steps=total_steps, checkpoint=checkpoint)
    if cfg.parallel.workers >= 1:
        from layerpar.runtime.engine import Engine  # Ray is imported only when workers are asked for

        return Engine(cfg, total_steps=total_steps, checkpoint=checkpoint)
    return LocalBackend(cfg, total_steps=total_steps, checkpoint=checkpoint)
