"""The engine the driver uses: W branch workers on Ray, one broadcast, one reduce.

    with Engine(cfg, total_steps=1000) as engine:
        logits = engine.infer(x)                 # x (B, C, H, W) float32
        engine.train_step(x, y)
        engine.save("runs/x/checkpoints/step_0000001", epoch=1)

Inference: the driver puts the batch into the object store once and hands every worker the same
reference; every worker is dispatched before any result is awaited. With the `collective` transport
the partial sums are reduced inside the worker group and rank 0 applies the head; with
`object_store` each worker returns its (B, D) partial sum and the driver adds them in rank order.
"""

from __future__ import annotations

import logging
import math
import os
import time

import ray
import torch

from layerpar.config import Config
from layerpar.model.paraformer import make_head, ordered_sum, prefix_sums
from layerpar.parallel.layout import BranchLayout
from layerpar.runtime.placement import bundle_strategy, place_workers, release
from layerpar.runtime.worker import RemoteBranchWorker


class WorkerError(RuntimeError):
    """A worker died or did not answer in time."""


class ClusterError(RuntimeError):
    """The Ray cluster cannot be reached."""


def connect(cfg: Config) -> bool:
    """Connect to the configured Ray cluster, or start a local one; True when this call started it."""
    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # loopback only, see NOTES.md
    address = cfg.parallel.address or os.environ.get("RAY_ADDRESS")
    if address:
        try:
            ray.init(address=address, logging_level=logging.WARNING, log_to_driver=True)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise ClusterError(
                f"cannot reach the Ray cluster at {address!r} ({exc}); start one with "
                "`ray start --head`, or leave parallel.address unset to run on a local Ray instance"
            ) from None
        return True
    need = math.ceil(cfg.parallel.workers * cfg.parallel.cpus_per_worker)
    ray.init(address="local", num_cpus=max(os.cpu_count() or 1, need), include_dashboard=False,
             logging_level=logging.WARNING)
    return True


class Engine:
    def __init__(self, cfg: Config, *, total_steps: int = 0, checkpoint: str | None = None):
        if cfg.parallel.workers < 1:
            raise ValueError("Engine needs parallel.workers >= 1; use LocalBackend for a single process")
        if cfg.model.kind != "paraformer":
            raise ValueError(f"Engine runs Para-Formers; model.kind is {cfg.model.kind!r}")
        self.cfg, self.total_steps = cfg, total_steps
        self.layout = BranchLayout(cfg.model.num_branches, cfg.parallel.workers)
        self.collective = cfg.parallel.transport == "collective"
        self.timeout_s = cfg.parallel.timeout_s
        self.last_timings: dict[str, float] = {}
        self.last_bytes: dict[str, int] = {}
        self._head: torch.nn.Module | None = None  # driver copy of the head (object_store, evaluation)
        self._pg = None
        self.workers: list = []
        self._owns_ray = connect(cfg)
        try:
            self._pg = place_workers(cfg.parallel)
            self._start_workers()
            if checkpoint is not None:
                self.load(checkpoint)
        except BaseException:
            self.shutdown()
            raise

    # ------------------------------------------------------------------ lifecycle

    def _start_workers(self) -> None:
        p = self.cfg.parallel
        self.workers = [
            RemoteBranchWorker.options(
                num_cpus=p.cpus_per_worker, num_gpus=p.gpus_per_worker,
                scheduling_strategy=bundle_strategy(self._pg, rank),
            ).remote(self.cfg.to_dict(), rank, self.total_steps)
            for rank in range(self.layout.num_workers)
        ]
        self.placement = self._get([w.where.remote() for w in self.workers])
        if self.collective and len(self.workers) > 1:
            self._form_group()

    def _form_group(self) -> None:
        """Ray Train's rendezvous: rank 0 offers an address and a free port, every rank joins at once,
        and the driver waits on all of them together."""
        addr, port = self._get(self.workers[0].offer_rendezvous.remote())
        world = len(self.workers)
        self._get([w.join_group.remote(addr, port, world) for w in self.workers])

    def shutdown(self) -> None:
        for w in self.workers:
            try:
                ray.kill(w)
            except Exception:  # noqa: BLE001 - already dead
                pass
        self.workers = []
        release(self._pg)
        self._pg = None
        if self._owns_ray and ray.is_initialized():
            ray.shutdown()
        self._owns_ray = False

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()

    def _get(self, refs, timeout_s: float | None = None):
        """ray.get with the engine's timeout; a dead or silent worker becomes a WorkerError."""
        try:
            return ray.get(refs, timeout=timeout_s or self.timeout_s)
        except ray.exceptions.GetTimeoutError:
            raise WorkerError(f"a worker did not answer within parallel.timeout_s="
                              f"{timeout_s or self.timeout_s:g}s") from None
        except ray.exceptions.RayActorError as exc:
            raise WorkerError(f"a branch worker died: {str(exc).splitlines()[0]}") from None

    # ------------------------------------------------------------------ inference

    def check_input(self, x) -> torch.Tensor:
        """A float32 (B, C, H, W) batch shaped for the model, or a ValueError saying what was expected."""
        m = self.cfg.model
        want = f"float32 tensor of shape (B, {m.in_channels}, {m.image_size}, {m.image_size})"
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"input must be a {want}, got {type(x).__name__}")
        if x.dtype != torch.float32:
            raise ValueError(f"input must be a {want}, got dtype {x.dtype}")
        if x.dim() != 4 or tuple(x.shape[1:]) != (m.in_channels, m.image_size, m.image_size) \
                or x.shape[0] < 1:
            raise ValueError(f"input must be a {want}, got shape {tuple(x.shape)}")
        return x.detach().cpu().contiguous()

    def _num_branches(self, num_branches: int | None) -> int:
        k = self.cfg.model.num_branches if num_branches is None else int(num_branches)
        if not 1 <= k <= self.cfg.model.num_branches:
            raise ValueError(f"num_branches ({k}) must be in 1..{self.cfg.model.num_branches}")
        return k

    def infer(self, x: torch.Tensor, num_branches: int | None = None) -> torch.Tensor:
        """Logits (B, classes) of the prefix model with `num_branches` branches (default all).
        Only the workers that own one of those branches are called."""
        x, k = self.check_input(x), self._num_branches(num_branches)
        t0 = time.perf_counter()
        ref = ray.put(x.numpy())  # one copy in the object store, one reference for every worker
        t1 = time.perf_counter()
        r = self.layout.participants(k)
        refs = [w.infer.remote(ref, k, self.collective) for w in self.workers[:r]]  # dispatch all
        outs = self._get(refs)  # ... then wait once
        t2 = time.perf_counter()
        if self.collective:
            logits, timings = outs[0]
        else:
            rows = torch.cat([o[0] for o in outs])  # (k, B, D) in branch order
            th = time.perf_counter()
            logits = self.head_module()(ordered_sum(rows))
            timings = {"embed": max(o[1]["embed"] for o in outs),
                       "compute": max(o[1]["compute"] for o in outs),
                       "reduce": time.perf_counter() - t2, "head": time.perf_counter() - th}
        total_s = time.perf_counter() - t0
        worker_s = sum(timings.get(p, 0.0) for p in ("embed", "compute", "reduce", "head"))
        self.last_timings = {**timings, "broadcast": t1 - t0, "total": total_s,
                             "dispatch": max(0.0, total_s - (t1 - t0) - worker_s)}
        row_bytes = x.shape[0] * self.cfg.model.dim * 4  # one pooled (B, D) row of one branch
        self.last_bytes = {"broadcast": x.numel() * 4, "reduce": r * self.layout.max_owned * row_bytes,
                           "result": logits.numel() * 4}
        return logits

    def head_module(self) -> torch.nn.Module:
        """The driver's copy of the (replicated, small) head, fetched from rank 0 when stale."""
        if self._head is None:
            pieces, _, _ = self._get(self.workers[0].pieces.remote(True))
            head = make_head(self.cfg.model, self.cfg.train.seed)
            head.load_state_dict({k.split(".", 1)[1]: v for k, v in pieces["head"].items()})
            self._head = head.eval().requires_grad_(False)
        return self._head

    @torch.no_grad()
    def prefix_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of every prefix model k = 1..N in one pass: (N, B, classes)."""
        ref = ray.put(self.check_input(x).numpy())
        outs = self._get([w.branch_outputs.remote(ref) for w in self.workers])
        return self.head_module()(prefix_sums(torch.cat(outs)))  # (N, B, D) in branch order

    # ------------------------------------------------------------------ training

    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> dict:
        """One batch of optimizer steps on every worker (joint or progressive per train.mode)."""
        if not self.collective and len(self.workers) > 1:
            raise ValueError("training needs parallel.transport=collective: gradients travel through "
                             "the workers' process group")
        x = self.check_input(x)
        y = torch.as_tensor(y, dtype=torch.int64)
        if y.shape != (x.shape[0],):
            raise ValueError(f"labels must have shape ({x.shape[0]},), got {tuple(y.shape)}")
        ref = ray.put((x.numpy(), y.numpy()))  # broadcast once
        outs = self._get([w.train_step.remote(ref) for w in self.workers])
        self._head = None  # the head moved
        return outs[0]

    # ------------------------------------------------------------------ state

    def _collect(self) -> tuple[dict, dict, int]:
        outs = self._get([w.pieces.remote(rank == 0) for rank, w in enumerate(self.workers)])
        pieces, optim = {}, {}
        for p, o, _ in outs:
            pieces.update(p)
            optim.update(o)
        return pieces, optim, outs[0][2]

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The whole model's weights, gathered from the workers (the driver holds none between calls)."""
        pieces, _, _ = self._collect()
        return {k: v for piece in pieces.values() for k, v in piece.items()}

    def save(self, path, *, epoch: int, extra: dict | None = None):
        from layerpar.train.checkpoint import save_checkpoint

        pieces, optim, step = self._collect()
        return save_checkpoint(path, pieces, config=self.cfg, step=step, epoch=epoch, optim=optim,
                               extra=extra)

    def load(self, path) -> dict:
        """Load a checkpoint written with any number of workers (or by a single process)."""
        from layerpar.train.checkpoint import load_checkpoint

        ckpt = load_checkpoint(path)
        step = int(ckpt.manifest.get("step", 0))
        refs = []
        for rank, w in enumerate(self.workers):
            wanted = ["embed", "head"] + [f"branch.{b}" for b in self.layout.owned(rank)]
            missing = [p for p in wanted if p not in ckpt.tensors]
            if missing:
                raise ValueError(f"checkpoint {path} lacks {', '.join(missing)} "
                                 f"(it holds {len(ckpt.tensors)} pieces)")
            pieces = {p: ckpt.tensors[p] for p in wanted}
            optim = {p: ckpt.optim[p] for p in wanted if p in (ckpt.optim or {})}
            refs.append(w.load.remote(pieces, optim or None, step))
        self._get(refs)
        self._head = None
        return ckpt.manifest

    def stats(self) -> list[dict]:
        """Per worker: call counts, parameter counts and branch ids (read from the workers)."""
        return self._get([w.stats.remote() for w in self.workers])

    def info(self) -> dict:
        stats = self.stats()
        return {"num_branches": self.cfg.model.num_branches, "workers": len(self.workers),
                "transport": self.cfg.parallel.transport, "layout": str(self.layout),
                "nodes": self.worker_nodes(),
                "params": sum(s["branches"] for s in stats) + stats[0]["replicated"]}

    def worker_nodes(self) -> list[str]:
        return [p["node_id"] for p in self.placement]
