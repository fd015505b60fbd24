"""What import, compression and expansion share: the error type, output run directories, sizes,
config overrides and evaluation of a checkpoint on its config's dataset."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from layerpar.config import Config, parse_override, save_config, with_overrides
from layerpar.train.checkpoint import latest_checkpoint, save_checkpoint, split_pieces


class LifecycleError(ValueError):
    """An import, compression or expansion cannot proceed; the message says why and what to do."""


def new_run_dir(out: str | Path) -> Path:
    """Create the output RUN_DIR; refuse one that already holds a checkpoint (never overwrite a run)."""
    out = Path(out)
    if out.exists() and latest_checkpoint(out) is not None:
        raise LifecycleError(f"{str(out)!r} already holds a checkpoint; choose a new --out directory")
    out.mkdir(parents=True, exist_ok=True)
    return out


def write_run(out: Path, state: dict[str, torch.Tensor], cfg: Config, *, step: int = 0, epoch: int = 0,
              extra: dict[str, Any] | None = None) -> Path:
    """Save a full model state as the first checkpoint of RUN_DIR `out` (+ its config.yaml)."""
    save_config(cfg, out)
    return save_checkpoint(out, split_pieces(state), config=cfg, step=step, epoch=epoch, extra=extra)


def dir_bytes(path: str | Path) -> int:
    """Bytes of every file under a directory (a checkpoint's size on disk)."""
    return sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(path) for f in files)


def num_params(state: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() for t in state.values())


def apply_overrides(cfg: Config, overrides: list[str] | None, *, allow_model: bool = False) -> Config:
    """`section.key=value` overrides on top of a checkpoint's config (data, train, parallel, serve).
    The model's shape comes from the weights, so model.* is refused unless allowed."""
    for item in overrides or []:
        if parse_override(item)[0][0] == "model" and not allow_model:
            raise LifecycleError(
                f"override {item!r}: the model's shape comes from the checkpoint and cannot be set here"
            )
    return with_overrides(cfg, overrides)


def evaluate_checkpoint(path: str | Path, cfg: Config, *, split: str = "test",
                        splits=None) -> dict[str, Any]:
    """Accuracy of the checkpoint's model (and of each of its prefixes) on a split of the dataset in
    cfg.data (or of `splits`, already loaded), computed in this process."""
    from layerpar.data import load_dataset
    from layerpar.train.evaluate import evaluate
    from layerpar.train.local import LocalBackend

    cfg = cfg.replace(parallel={"workers": 0})
    data = getattr(splits if splits is not None else load_dataset(cfg), split)
    with LocalBackend(cfg, checkpoint=path) as backend:
        metrics = evaluate(backend, data, batch_size=256)
    return {"split": split, "dataset": cfg.data.name, **metrics}
