"""AdamW with warm-up + cosine decay, set up by parameter name.

Groups are chosen from names alone, so a worker that holds a few branches gives each parameter the
same hyper-parameters as the whole model does in one process.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def decays(name: str, p: torch.Tensor) -> bool:
    """Weight decay on matrices only: not on biases, norm weights, the CLS token or the positions."""
    return p.dim() >= 2 and not name.endswith((".cls", ".pos"))


def frozen(name: str, tcfg) -> bool:
    """Whether train.frozen_branches keeps this parameter fixed: the embedding, the head and
    branches below it (expansion trains only the appended branches)."""
    n = tcfg.frozen_branches
    if not n:
        return False
    first, _, rest = name.partition(".")
    return first in ("embed", "head") or (first == "branches" and int(rest.partition(".")[0]) < n)


def make_optimizer(model: nn.Module, tcfg) -> torch.optim.AdamW:
    """AdamW over the trainable parameters; parameters frozen by train.frozen_branches are switched
    to requires_grad=False here (every trainer builds its optimizer), so they get no gradient."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if frozen(name, tcfg):
            p.requires_grad_(False)
        if p.requires_grad:
            (decay if decays(name, p) else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": tcfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=tcfg.lr, betas=(0.9, 0.999), eps=1e-8, foreach=True)


def lr_at(step: int, total_steps: int, tcfg) -> float:
    """Learning rate before optimizer step `step` (0-based): linear warm-up, then cosine to min_lr."""
    warmup = int(tcfg.warmup_fraction * total_steps)
    if step < warmup:
        return tcfg.lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
    return tcfg.min_lr + 0.5 * (tcfg.lr - tcfg.min_lr) * (1.0 + math.cos(math.pi * progress))


def set_lr(opt: torch.optim.Optimizer, lr: float) -> None:
    for group in opt.param_groups:
        group["lr"] = lr




def optimizer_state(model: nn.Module, opt: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """AdamW state keyed by parameter name (`<name>.exp_avg`, `.exp_avg_sq`, `.step`), so it can be
    saved per piece and loaded by any worker layout."""
    out = {}
    for name, p in model.named_parameters():
        state = opt.state.get(p)
        if state:
            for key in ("exp_avg", "exp_avg_sq", "step"):
                out[f"{name}.{key}"] = torch.as_tensor(state[key]).detach().clone()
    return out


def load_optimizer_state(model: nn.Module, opt: torch.optim.Optimizer,
                         tensors: dict[str, torch.Tensor]) -> None:
    """Inverse of optimizer_state for the parameters this model holds; others are ignored."""
    for name, p in model.named_parameters():
        if f"{name}.exp_avg" in tensors:
            opt.state[p] = {
                "step": tensors[f"{name}.step"].clone().to(torch.float32),
                "exp_avg": tensors[f"{name}.exp_avg"].clone().to(p.device),
                "exp_avg_sq": tensors[f"{name}.exp_avg_sq"].clone().to(p.device),
            }
