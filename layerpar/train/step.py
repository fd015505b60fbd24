"""One training step, written once against the comm verbs: the same code trains the whole model in
one process (LocalComm) and a worker's share of it inside a process group (GroupComm).

joint:       one step on the loss of the full sum of branches.
progressive: for k = 1..N a step on the loss of the prefix model (branches 0..k-1), then one joint
             step. Branches at or beyond k take no part in step k: they get no gradient (None, not
             zero), so AdamW neither moves nor decays them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from layerpar.model import ParaFormer
from layerpar.model.dropout import DropoutDraw
from layerpar.parallel.comm import sq_norm
from layerpar.train.optim import lr_at, set_lr
from layerpar.train.precision import autocast, wide


def _clip(params: list[nn.Parameter], norm: torch.Tensor, max_norm: float) -> None:
    """Scale gradients as torch.nn.utils.clip_grad_norm_ does, from a norm computed elsewhere."""
    coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
    if params:
        grad = params[0].grad
        torch._foreach_mul_([p.grad for p in params], coef.to(grad.device, grad.dtype))


def prefix_plan(cfg) -> list[int]:
    """The prefix size k of each optimizer step taken on one batch."""
    n = cfg.model.num_branches
    if cfg.train.mode == "progressive" and cfg.model.kind in ("paraformer", "paraformer_lm"):
        # prefixes made only of frozen branches have nothing to train
        return list(range(cfg.train.frozen_branches + 1, n + 1)) + [n]
    return [n]


def train_step(model: nn.Module, opt: torch.optim.Optimizer, comm, x: torch.Tensor,
               y: torch.Tensor, *, cfg, step: int, total_steps: int, batch_rows: int | None = None,
               row_start: int = 0, scaler=None) -> dict:
    """Run every optimizer step of one batch; `step` counts optimizer steps taken before it.

    batch_rows: the whole batch's size when (x, y) is one replica's share of it (a training mesh):
    the loss of these rows is divided by it, so the sum over replicas (comm.sum_grads) is the whole
    batch's mean loss and its gradient. None: (x, y) is the whole batch (the mean loss).
    row_start: where the share begins in the whole batch. A Para-Former's dropout masks are drawn per
    (train.seed, optimizer step, branch) for the whole batch and this share's rows taken
    (model/dropout.py): every layout drops what one process drops.
    train.precision bfloat16/float16: the forward runs under autocast, the branch rows are reduced
    in float32, and the loss is float32; `scaler` (a precision.LossScale, float16) scales the loss
    and skips a step whose gradients overflowed, on every rank alike."""
    tcfg = cfg.train
    cast = autocast(tcfg.precision, x.device)
    losses, lr, norm = [], 0.0, torch.zeros(())
    for k in prefix_plan(cfg):
        lr = lr_at(step, total_steps, tcfg)
        set_lr(opt, lr)
        opt.zero_grad(set_to_none=True)
        if isinstance(model, ParaFormer):
            draw = DropoutDraw(seed=tcfg.seed, step=step, p=cfg.model.dropout, row_start=row_start,
                               total_rows=batch_rows) if cfg.model.dropout > 0 else None
            with cast:
                x0 = model.embed(x)  # (B, T, D), replicated on every worker
                outputs = model.branch_outputs(x0, model.prefix_ids(k), draw=draw)  # (K_w, B, D), own < k
            y_sum = comm.reduce_branch_sums(wide(outputs), num_branches=k)  # float32 across ranks
            with cast:
                logits = model.head(y_sum)
            replicated = list(model.embed.parameters()) + list(model.head.parameters())
        else:
            with cast:
                logits = model(x)
            replicated = list(model.parameters())
        logits = wide(logits)  # the loss in float32
        if batch_rows is None:
            loss = F.cross_entropy(logits, y, label_smoothing=tcfg.label_smoothing)
        else:
            loss = F.cross_entropy(logits, y, label_smoothing=tcfg.label_smoothing,
                                   reduction="sum") / batch_rows
        if loss.requires_grad:  # false on a worker whose branches are all frozen
            (loss * scaler.scale if scaler is not None else loss).backward()
        ids = set(map(id, replicated))
        owned = [p for p in model.parameters() if p.grad is not None and id(p) not in ids]
        # the gradients of the whole batch (summed over replicas, the embedding's over branch ranks
        # too), and the squared norm of every rank's own gradients: at most two sums
        paraformer = isinstance(model, ParaFormer)
        embed = list(model.embed.parameters()) if paraformer else []
        head = list(model.head.parameters()) if paraformer else replicated
        owned_sq, loss_value = comm.sum_grads(owned, head, embed, loss.detach())
        rep_sq = sq_norm([p.grad for p in replicated if p.grad is not None])
        norm = (owned_sq + rep_sq.to(owned_sq.device)).sqrt()
        norm = apply_step(opt, owned + [p for p in replicated if p.grad is not None], norm, tcfg, scaler)
        step += 1
        losses.append(loss_value)
    return step_result(losses, lr, norm, step)


def apply_step(opt: torch.optim.Optimizer, grads: list[nn.Parameter], norm: torch.Tensor, tcfg,
               scaler=None) -> torch.Tensor:
    """The optimizer step of gradients already summed across ranks, whose global norm is `norm`:
    float16 (`scaler`): unscale, and skip the step where they overflowed (the schedule moves on, the
    weights do not: torch.amp's skipped step; the norm is global, so every rank decides alike); clip
    to train.grad_clip; step. Returns the (unscaled) norm."""
    if scaler is not None:
        inv = 1.0 / scaler.scale
        if grads:
            torch._foreach_mul_([p.grad for p in grads], inv)
        norm = norm * inv
        if not scaler.update(bool(torch.isfinite(norm))):
            return norm
    if tcfg.grad_clip > 0:
        _clip(grads, norm, tcfg.grad_clip)
    opt.step()
    return norm


def step_result(losses: list[float], lr: float, norm: torch.Tensor, step: int) -> dict:
    """A batch's record: the last (joint) loss, the learning rate, the norm, the step count, and the
    progressive prefixes' losses before it."""
    out = {"loss": losses[-1], "lr": lr, "grad_norm": float(norm), "step": step}
    if len(losses) > 1:
        out["prefix_losses"] = losses[:-1]
    return out
