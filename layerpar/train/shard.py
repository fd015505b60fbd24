"""A worker's share of a Para-Former: its branches, replicas of the embedding and head, its optimizer
and its comm. Plain Python: the Ray actor wraps it, and a torchrun process can use it directly.
"""

from __future__ import annotations

import time

import torch

from layerpar.config import Config
from layerpar.model import ParaFormer, build_model
from layerpar.parallel import process_group
from layerpar.parallel.comm import GroupComm, LocalComm
from layerpar.parallel.layout import BranchLayout
from layerpar.train.checkpoint import split_pieces
from layerpar.train.optim import load_optimizer_state, make_optimizer, optimizer_state
from layerpar.train.precision import LossScale, autocast, wide
from layerpar.train.step import train_step


class TimedComm:
    """A comm whose every verb adds its wall time (waiting for peers included) to `seconds`."""

    def __init__(self, comm) -> None:
        self._comm, self.seconds = comm, 0.0
        self.rank, self.world_size = comm.rank, comm.world_size

    def __getattr__(self, name):
        verb = getattr(self._comm, name)
        if not callable(verb):  # replicas, replica, traffic, layout
            return verb

        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return verb(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - t0

        return timed


class BranchShard:
    def __init__(self, cfg: Config, *, worker_rank: int, total_steps: int = 0):
        self.cfg = cfg
        self.layout = BranchLayout(cfg.model.num_branches, max(1, cfg.parallel.workers))
        self.worker_rank = worker_rank
        self.device = torch.device("cuda" if cfg.parallel.gpus_per_worker > 0 else "cpu")
        # a ViT (serial baseline) trains in one process only: a world of one holds all of it
        self.model = build_model(cfg.model, seed=cfg.train.seed,
                                 branch_ids=self.layout.owned(worker_rank)).to(self.device)
        self.opt = make_optimizer(self.model, cfg.train)
        self.scaler = LossScale.for_precision(cfg.train.precision)  # float16 only
        self.compile_s = compile_branches(self.model) if cfg.model.compile else 0.0
        self.total_steps, self.step = total_steps, 0
        self.comms: dict[int, object] = {1: LocalComm()}
        self.calls = {"infer": 0, "partial": 0, "train_step": 0, "branch_outputs": 0}

    # ------------------------------------------------------------------ group

    def join_group(self) -> None:
        """Join the process group from the torchrun variables; blocks until every rank joins."""
        timeout_s = self.cfg.parallel.timeout_s
        process_group.init_from_env(timeout_s=timeout_s, device=self.device)
        for r, group in process_group.new_prefix_groups(self.layout.num_workers, timeout_s=timeout_s).items():
            self.comms[r] = GroupComm(self.layout, group)

    def attach_group(self) -> GroupComm:
        """Use a default process group someone else formed (Ray Train's TorchTrainer, torchrun) for
        training: one comm over every rank, or with parallel.replicas = R > 1 over this rank's branch
        group of the (replica, branch) mesh; the inference sub-groups are not made."""
        replicas, workers = self.cfg.parallel.replicas, self.layout.num_workers
        if replicas > 1:
            comm = GroupComm(self.layout, *process_group.new_mesh(replicas, workers, self.device,
                                                                  timeout_s=self.cfg.parallel.timeout_s))
        else:
            comm = GroupComm(self.layout, None)
            if comm.world_size != workers:
                raise RuntimeError(f"the process group has {comm.world_size} ranks but parallel.workers "
                                   f"is {workers}")
        if comm.rank != self.worker_rank:
            raise RuntimeError(f"this rank owns the branches of worker {self.worker_rank} but is rank "
                               f"{comm.rank} of its branch group")
        self.comms[workers] = comm
        return comm

    @classmethod
    def attached(cls, cfg: Config, *, global_rank: int, total_steps: int) -> tuple[BranchShard, TimedComm]:
        """This rank's shard in a default process group someone else formed (Ray Train, torchrun):
        it owns the branches of branch rank global_rank % W (the mesh's rank order), is attached to its
        branch group, and its training collectives go through the returned timer."""
        shard = cls(cfg, worker_rank=global_rank % max(1, cfg.parallel.workers), total_steps=total_steps)
        comm = TimedComm(shard.attach_group())
        shard.comms[shard.layout.num_workers] = comm
        return shard, comm

    def leave_group(self) -> None:
        self.comms = {1: LocalComm()}
        process_group.destroy()

    # ------------------------------------------------------------------ compute

    def on_device(self, x) -> torch.Tensor:
        return torch.as_tensor(x).to(self.device, non_blocking=True)

    def autocast(self):
        """train.precision's autocast on this shard's device (a no-op for float32)."""
        return autocast(self.cfg.train.precision, self.device)

    def branch_rows(self, x0: torch.Tensor, branch_ids) -> torch.Tensor:
        """Pooled rows of the listed owned branches (K, B, D), in float32 whatever the precision."""
        with self.autocast():
            return wide(self.model.branch_outputs(x0, branch_ids))

    @torch.no_grad()
    def infer(self, x, num_branches: int, *, reduce: bool) -> tuple[torch.Tensor | None, dict]:
        """This worker's part of a prefix-model forward. reduce=True: the branch rows are reduced in
        the group and rank 0 returns the logits (others None); reduce=False: return the rows
        (K_w, B, D) for the driver to add."""
        self.calls["infer" if reduce else "partial"] += 1
        self.model.eval()
        t0 = time.perf_counter()
        with self.autocast():
            x0 = self.model.embed(self.on_device(x))  # (B, T, D)
        t1 = time.perf_counter()
        rows = self.branch_rows(x0, self.model.prefix_ids(num_branches))  # (K_w, B, D), float32
        t2 = time.perf_counter()
        timings = {"embed": t1 - t0, "compute": t2 - t1}
        if not reduce:
            return rows.cpu(), timings
        comm = self.comms[self.layout.participants(num_branches)]
        y = comm.gather_branch_sums(rows, num_branches)  # the sum on rank 0, None elsewhere
        t3 = time.perf_counter()
        timings["reduce"] = t3 - t2
        if self.worker_rank != 0:
            return None, timings
        with self.autocast():
            logits = wide(self.model.head(y)).cpu()
        timings["head"] = time.perf_counter() - t3
        return logits, timings

    @torch.no_grad()
    def branch_outputs(self, x) -> torch.Tensor:
        """Pooled output of every owned branch (K, B, D), for evaluating all prefix models at once."""
        self.calls["branch_outputs"] += 1
        self.model.eval()
        with self.autocast():
            x0 = self.model.embed(self.on_device(x))
        return self.branch_rows(x0, self.model.branch_ids).cpu()

    def train_step(self, x, y, share: tuple[int, int] | None = None) -> dict:
        """One batch's optimizer steps; in a training mesh (R > 1 replicas) every rank is given the
        whole batch and trains on its replica's share of the rows (torch.tensor_split's). share:
        (x, y) is already this replica's share -- (rows of the whole batch, its first row) -- as a
        streamed feed (train/feed.py) reads it."""
        self.calls["train_step"] += 1
        self.model.train()
        comm = self.comms[self.layout.num_workers]
        rows, start = None, 0
        if share is not None:
            rows, start = share if comm.replicas > 1 else (None, 0)
        elif comm.replicas > 1:
            rows = len(y)
            shares = torch.tensor_split(torch.arange(rows), comm.replicas)
            start = int(shares[comm.replica][0]) if len(shares[comm.replica]) else rows
            x, y = (torch.tensor_split(torch.as_tensor(t), comm.replicas)[comm.replica] for t in (x, y))
        out = train_step(self.model, self.opt, comm, self.on_device(x), self.on_device(y), cfg=self.cfg,
                         step=self.step, total_steps=self.total_steps, batch_rows=rows, row_start=start,
                         scaler=self.scaler)
        self.step = out["step"]
        return out

    # ------------------------------------------------------------------ state

    def pieces(self, *, replicated: bool) -> dict[str, dict[str, torch.Tensor]]:
        """Weights by piece ("branch.<i>", plus "embed" and "head" when `replicated`), on the CPU."""
        if not isinstance(self.model, ParaFormer):  # a ViT: all of it, in one process
            return split_pieces({k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()})
        names = [p for p in self.model.pieces() if replicated or p.startswith("branch.")]
        return {p: {k: v.detach().cpu().clone() for k, v in self.model.piece_state(p).items()}
                for p in names}

    def optim_pieces(self, *, replicated: bool) -> dict[str, dict[str, torch.Tensor]]:
        state = optimizer_state(self.model, self.opt)
        out = {}
        for piece, weights in self.pieces(replicated=replicated).items():
            out[piece] = {k: v for k, v in state.items() if k.rsplit(".", 1)[0] in weights}
        return out

    def load(self, pieces: dict[str, dict[str, torch.Tensor]], optim: dict | None, step: int) -> None:
        """Load the pieces this worker holds (others are ignored) and the optimizer state."""
        flat = {k: v for piece in pieces.values() for k, v in piece.items()}
        own = self.model.state_dict()
        missing = [k for k in own if k not in flat]
        if missing:
            raise KeyError(f"checkpoint lacks {len(missing)} tensors this worker needs, e.g. {missing[0]}")
        self.model.load_state_dict({k: flat[k] for k in own})
        if optim:
            load_optimizer_state(self.model, self.opt,
                                 {k: v for piece in optim.values() for k, v in piece.items()})
        self.step = step

    def param_counts(self) -> dict[str, int]:
        if not isinstance(self.model, ParaFormer):
            return {"branches": 0, "replicated": sum(p.numel() for p in self.model.parameters()),
                    "branch_ids": []}
        branches = sum(p.numel() for b in self.model.branch_ids
                       for p in self.model.branch(b).parameters())
        replicated = sum(p.numel() for m in (self.model.embed, self.model.head)
                         for p in m.parameters())
        return {"branches": branches, "replicated": replicated, "branch_ids": self.model.branch_ids}


def compile_branches(model) -> float:
    """model.compile: the fused branch stack's forward (ParaFormer.branch_outputs, which runs
    model/fused.py) becomes a torch.compile'd function of this model object; the model code stays
    eager and pure. Returns the seconds spent here (compiling itself happens at the first calls)."""
    if not isinstance(model, ParaFormer):
        return 0.0
    t0 = time.perf_counter()
    model.branch_outputs = torch.compile(model.branch_outputs)  # an instance attribute shadows the method
    return time.perf_counter() - t0
