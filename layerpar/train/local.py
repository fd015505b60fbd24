"""The single-process Backend (layerpar/runtime/backend.py): the whole model, its optimizer and the
shared training step in this process. `layerpar.runtime.Engine` implements the same protocol with Ray
branch workers; `layerpar.runtime.backend.make_backend` picks one from the config.

    with LocalBackend(cfg, total_steps=1000) as backend:
        backend.train_step(x, y); logits = backend.infer(x); backend.save(run_dir, epoch=1)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from layerpar.model import ParaFormer, build_model
from layerpar.model.overflow import check_finite_logits
from layerpar.model.paraformer import prefix_sums
from layerpar.parallel.comm import LocalComm
from layerpar.train.checkpoint import (
    CheckpointError,
    load_checkpoint,
    model_state,
    optim_state,
    save_checkpoint,
    split_pieces,
)
from layerpar.train.evaluate import evaluate
from layerpar.train.optim import load_optimizer_state, make_optimizer, optimizer_state
from layerpar.train.precision import autocast, wide
from layerpar.train.shard import compile_branches
from layerpar.train.step import train_step


def check_model_config(cfg, ckpt_cfg, where: str) -> None:
    """A checkpoint fits a model only if every model field agrees; name the first that does not."""
    for name, value in vars(cfg.model).items():
        if name in ("dropout", "dtype"):  # neither changes the weights' shapes or meaning (load casts)
            continue
        other = getattr(ckpt_cfg.model, name)
        if other != value:
            raise CheckpointError(
                f"{where}: checkpoint has model.{name}={other!r} but the config asks for {value!r}"
            )


@torch.no_grad()
def prefix_logits_of(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Logits of every prefix model k = 1..N in one pass: (B, C, H, W) -> (N, B, classes).
    The branches run once; prefix k's input is the running sum of branches 0..k-1, added in branch
    order exactly as ParaFormer.branch_sum does. A ViT has one 'prefix': (1, B, classes)."""
    if not isinstance(model, ParaFormer):
        return model(x).unsqueeze(0)
    x0 = model.embed(x)  # (B, T, D)
    outs = model.branch_outputs(x0, model.branch_ids)  # (N, B, D)
    return model.head(prefix_sums(outs))  # (N, B, classes); row N-1 equals branch_sum bit for bit


class LocalBackend:
    """Backend protocol in one process (LocalComm: every collective verb is the identity)."""

    def __init__(self, cfg, *, total_steps: int = 0, checkpoint: str | Path | None = None):
        self.cfg = cfg
        if cfg.train.threads:
            torch.set_num_threads(cfg.train.threads)
        torch.manual_seed(cfg.train.seed)  # dropout, if any
        self.model = build_model(cfg.model, seed=cfg.train.seed)
        if cfg.model.compile:
            compile_branches(self.model)
        self.opt = make_optimizer(self.model, cfg.train)
        self.comm = LocalComm()
        self.total_steps = total_steps
        self.step = 0
        if checkpoint is not None:
            self.load(checkpoint)

    # ------------------------------------------------------------------ compute

    def prefix_work(self, k: int | None) -> int:
        """Branches computed for the prefix model of k branches (a cost unit of the latency target)."""
        return self.cfg.model.num_branches if k is None else k

    def infer(self, x: torch.Tensor, num_branches: int | None = None) -> torch.Tensor:
        """(B, C, H, W) -> logits (B, classes) of the prefix model of the first num_branches.
        Raises InputOverflow (a ValueError) when a row's values overflow the model (NaN/Inf logits)."""
        return check_finite_logits(self.infer_with_meta(x, num_branches)[0])

    @torch.no_grad()
    def infer_with_meta(self, x: torch.Tensor, num_branches: int | None = None
                        ) -> tuple[torch.Tensor, dict]:
        """(logits as computed, meta): one process is never degraded."""
        self.model.eval()
        n = self.cfg.model.num_branches
        if not isinstance(self.model, ParaFormer) and num_branches not in (None, n):
            raise ValueError(f"a ViT has no prefix models; num_branches must be None, got {num_branches}")
        with autocast(self.cfg.train.precision, "cpu"):  # train.precision: inference under autocast too
            logits = self.model(x, num_branches) if isinstance(self.model, ParaFormer) else self.model(x)
        return wide(logits), {"degraded": False, "branches_used": list(range(num_branches or n))}

    def prefix_logits(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (N, B, classes), the logits of every prefix k = 1..N ((1, B, C) for a ViT)."""
        self.model.eval()
        with autocast(self.cfg.train.precision, "cpu"):
            return wide(prefix_logits_of(self.model, x))

    def evaluate(self, split, batch_size: int = 256) -> dict:
        """Accuracy and loss of the full model and the accuracy of every prefix k = 1..N."""
        return evaluate(self, split, batch_size)

    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> dict:
        """Every optimizer step of one batch (1 joint, or N+1 progressive); see train.step."""
        self.model.train()
        out = train_step(self.model, self.opt, self.comm, x, y, cfg=self.cfg, step=self.step,
                         total_steps=self.total_steps)
        self.step = out["step"]
        return out

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().to("cpu").clone() for k, v in self.model.state_dict().items()}

    def save(self, path: str | Path, *, epoch: int, extra: dict[str, Any] | None = None) -> Path:
        """Checkpoint weights, AdamW state and step count; `path` is a RUN_DIR or a checkpoint dir."""
        return save_checkpoint(
            path, split_pieces(self.model.state_dict()), config=self.cfg, step=self.step, epoch=epoch,
            optim=split_pieces(optimizer_state(self.model, self.opt)), extra=extra,
        )

    def load(self, path: str | Path, *, weights_only: bool = False) -> dict[str, Any]:
        """Restore weights, optimizer state and step from a checkpoint (or a RUN_DIR's latest);
        returns its manifest. weights_only (serving): the optimizer state is not read at all."""
        ckpt = load_checkpoint(path, with_optim=not weights_only)
        check_model_config(self.cfg, ckpt.config, str(ckpt.path))
        try:
            self.model.load_state_dict(model_state(ckpt), strict=True)
        except RuntimeError as exc:
            raise CheckpointError(f"{ckpt.path}: weights do not fit the model ({exc})") from None
        self.opt = make_optimizer(self.model, self.cfg.train)  # fresh state, then the saved one
        if not weights_only:
            load_optimizer_state(self.model, self.opt, optim_state(ckpt))
        self.step = ckpt.step
        return ckpt.manifest

    def info(self) -> dict[str, Any]:
        m = self.cfg.model
        return {
            "kind": m.kind,
            "num_branches": m.num_branches if m.kind == "paraformer" else 1,  # prefix models
            "blocks": m.num_blocks,
            "workers": 0,
            "transport": "local",
            "params": sum(p.numel() for p in self.model.parameters()),
            "step": self.step,
            "threads": torch.get_num_threads(),
            "device": "cpu",
        }

    def shutdown(self) -> None:
        return None

    def __enter__(self) -> LocalBackend:
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()

