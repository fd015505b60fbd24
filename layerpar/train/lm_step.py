"""One training step of a language model, written once against the comm verbs (as train/step.py is
for the image model): the whole LM in one process (LocalComm), or a worker's share of the
Para-Former LM's branches inside a process group (GroupComm).

    out = lm_train_step(model, opt, comm, x, y, cfg=cfg, step=s, total_steps=n)   # x, y (B, T)

The branch rows are the full sequences, (K_w, B, T, D): flattened to (K_w, B*T, D) they go through
the same reduce_branch_sums as the image model's pooled rows, so each optimizer step reduces once
whatever the depth. The prefix plan is train/step.py's (joint: one step on the full sum;
progressive: a step per prefix k = 1..N, then a joint one); branches at or beyond k get no
gradient.

The tied head: the LM head is the token embedding's transpose. Its gradient has two parts that the
ranks hold differently: the head's part is the same on every rank of a replica (every rank computes
the same loss from the same reduced sum), the embedding's part is each rank's share (from its own
branches) and is summed over the branch ranks. Summing the tied weight's whole gradient would count
the head's part W times, so the head reads a detached copy of the weight with a gradient of its own
(`head` in sum_grads), and the two parts are added after the sums.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from layerpar.model.lm import ParaFormerLM
from layerpar.parallel.comm import sq_norm
from layerpar.train.optim import lr_at, set_lr
from layerpar.train.precision import autocast, wide
from layerpar.train.step import apply_step, prefix_plan, step_result


def lm_train_step(model, opt: torch.optim.Optimizer, comm, x: torch.Tensor, y: torch.Tensor, *, cfg,
                  step: int, total_steps: int, batch_rows: int | None = None, scaler=None) -> dict:
    """Every optimizer step of one batch of windows x, y (B, T) int64; `step` counts the optimizer
    steps before it. batch_rows: the whole batch's windows when (x, y) is one replica's share (the
    loss is then divided by the whole batch's token count, so the sum over replicas is the whole
    batch's mean loss). Returns {"loss", "lr", "grad_norm", "step"[, "prefix_losses"]}."""
    tcfg = cfg.train
    cast = autocast(tcfg.precision, x.device)
    tokens = y.numel() if batch_rows is None else batch_rows * y.shape[1]
    paraformer = isinstance(model, ParaFormerLM)
    embed = [model.tok, model.pos]
    norm = [model.norm.weight, model.norm.bias]
    owned_params = [p for n, p in model.named_parameters() if n.startswith(("branches.", "blocks."))]
    losses, lr, gnorm = [], 0.0, torch.zeros(())
    for k in prefix_plan(cfg):
        lr = lr_at(step, total_steps, tcfg)
        set_lr(opt, lr)
        opt.zero_grad(set_to_none=True)
        tied = model.head_w is None
        head_w = model.tok.detach().requires_grad_() if tied else model.head_w
        with cast:
            x0 = model.embed(x)  # (B, T, D), replicated on every rank
            if not paraformer:
                h = model.trunk(x0)
            else:
                rows = model.owned_outputs(x0, [b for b in model.branch_ids if b < k])  # (K_w, B, T, D)
        if paraformer:
            b, t, d = x0.shape
            h = comm.reduce_branch_sums(wide(rows).reshape(rows.shape[0], b * t, d), num_branches=k)
            h = h.view(b, t, d)
        with cast:
            logits = model.logits(h, weight=head_w)
        loss = F.cross_entropy(wide(logits).reshape(-1, logits.shape[-1]), y.reshape(-1),
                               label_smoothing=tcfg.label_smoothing, reduction="sum") / tokens
        (loss * scaler.scale if scaler is not None else loss).backward()
        owned = [p for p in owned_params if p.grad is not None]
        owned_sq, loss_value = comm.sum_grads(owned, [*norm, head_w], embed, loss.detach())
        if tied:  # the head's part (agreed) plus the embedding's (summed over ranks)
            model.tok.grad = head_w.grad if model.tok.grad is None else model.tok.grad + head_w.grad
        mine = set(map(id, owned))
        replicated = [p for p in model.parameters() if p.grad is not None and id(p) not in mine]
        rep_sq = sq_norm([p.grad for p in replicated])
        gnorm = (owned_sq + rep_sq.to(owned_sq.device)).sqrt()
        gnorm = apply_step(opt, owned + replicated, gnorm, tcfg, scaler)
        step += 1
        losses.append(loss_value)
    return step_result(losses, lr, gnorm, step)
