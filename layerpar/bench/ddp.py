"""The data-parallel baseline of the training sweep: the whole Para-Former on every rank, wrapped in
torch's DistributedDataParallel -- what a user would otherwise pick -- on the same batches as
layerpar's mesh.

Each of the D ranks trains on its share of every batch (torch.tensor_split's, as a mesh replica
does); its loss is the share's summed loss over the batch's size, times D, because DDP averages the
gradients over the ranks: so the average is the whole batch's mean-loss gradient, for any split.
Then torch.nn.utils.clip_grad_norm_ and AdamW, with the schedule and parameter groups of
layerpar.train. DDP moves every parameter's gradient each step (bucketed all-reduces, overlapped
with the backward pass); a comm hook counts the bytes (ring all-reduce: 2(D-1)/D of each bucket).

This file runs its own collectives (DDP's); layerpar's are all in layerpar/parallel/comm.py.
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
from torch.nn.parallel import DistributedDataParallel

from layerpar.model import ParaFormer
from layerpar.parallel.comm import Traffic
from layerpar.train.optim import lr_at, make_optimizer, set_lr


def counted_allreduce(traffic: Traffic, world: int):
    """The default all-reduce comm hook, counting what it sends."""

    def hook(_state, bucket):
        traffic.add("all_reduce", bucket.buffer().nbytes, world)
        return allreduce_hook(None, bucket)

    return hook


class DDPTrainer:
    """One rank of DDP over the default process group (communicate=False: the same step with DDP's
    no_sync, i.e. no gradient exchange -- the compute-only time; its weights drift apart)."""

    def __init__(self, cfg, *, total_steps: int, communicate: bool = True) -> None:
        self.cfg, self.total_steps, self.step, self.communicate = cfg, total_steps, 0, communicate
        self.world, self.rank = dist.get_world_size(), dist.get_rank()
        # parallel.gpus_per_worker > 0: this rank's GPU (set_up_rank made it current), NCCL's group
        self.device = torch.device("cuda", torch.cuda.current_device()) \
            if cfg.parallel.gpus_per_worker > 0 else torch.device("cpu")
        model = ParaFormer(cfg.model, seed=cfg.train.seed).to(self.device)
        self.opt = make_optimizer(model, cfg.train)
        self.module = model
        self.ddp = DistributedDataParallel(
            model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        self.traffic = Traffic()
        self.ddp.register_comm_hook(None, counted_allreduce(self.traffic, self.world))

    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> dict:
        t = self.cfg.train
        rows = len(y)
        x, y = (torch.tensor_split(v, self.world)[self.rank].to(self.device, non_blocking=True)
                for v in (x, y))
        set_lr(self.opt, lr := lr_at(self.step, self.total_steps, t))
        self.opt.zero_grad(set_to_none=True)
        with contextlib.nullcontext() if self.communicate else self.ddp.no_sync():
            logits = self.ddp(x)
            loss = F.cross_entropy(logits, y, label_smoothing=t.label_smoothing, reduction="sum")
            (loss * (self.world / rows)).backward()  # DDP divides the sum over ranks by D
        params = [p for p in self.module.parameters() if p.grad is not None]
        if t.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, t.grad_clip, foreach=True)
        self.opt.step()
        self.step += 1
        return {"loss": float(loss.detach()) / rows, "lr": lr, "step": self.step}

    def state(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu().clone() for k, v in self.module.state_dict().items()}
