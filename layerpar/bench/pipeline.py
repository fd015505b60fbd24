"""The serial ViT, pipeline-parallel over W processes with torch.distributed.pipelining (GPipe).

This is how a user would otherwise spread a deep model over W devices: the same L = N * depth blocks
cut into W contiguous stages (the embedding on the first, the head on the last), each stage in its
own process with one torch thread, activations passed stage to stage over gloo, the batch split
into micro-batches that flow through the stages in a fill-drain (GPipe) schedule.

    pool = PipelinePool(world_size=2)
    logits, samples_s = pool.run(model_cfg, seed=0, x=x, micro_batches=1, warmup=2, reps=10)
    pool.close()

Latency is timed inside the group: every repetition starts when rank 0 tells all ranks to go
(a broadcast, so every rank starts together) and ends when the last stage holds the logits. The
input already sits on rank 0 and the logits stay on the last rank, so no driver dispatch is counted:
this favours the baseline (layerpar's latencies include the driver's dispatch).
"""

from __future__ import annotations

import os
import queue
import time
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from layerpar.model.layers import pool as pool_rows
from layerpar.model.vit import ViT


def stage_bounds(num_blocks: int, num_stages: int) -> list[tuple[int, int]]:
    """Contiguous, balanced [lo, hi) block ranges, one per stage (the first ones get one more)."""
    if not 1 <= num_stages <= num_blocks:
        raise ValueError(f"a pipeline of {num_blocks} blocks cannot have {num_stages} stages "
                         f"(1..{num_blocks})")
    base, extra = divmod(num_blocks, num_stages)
    bounds, lo = [], 0
    for s in range(num_stages):
        hi = lo + base + (s < extra)
        bounds.append((lo, hi))
        lo = hi
    return bounds


class ViTStage(nn.Module):
    """Blocks [lo, hi) of a ViT; the first stage also embeds, the last also pools and applies the
    head, so that chaining every stage gives exactly ViT.forward."""

    def __init__(self, vit: ViT, lo: int, hi: int):
        super().__init__()
        n = len(vit.blocks)
        self.embed = vit.embed if lo == 0 else None
        self.blocks = nn.ModuleList(vit.blocks[lo:hi])
        self.head = vit.head if hi == n else None
        self.pool = vit.cfg.pool

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if self.embed is not None:
            h = self.embed(h)  # (B, C, H, W) -> (B, T, D)
        last = len(self.blocks) - 1
        for i, block in enumerate(self.blocks):
            # the model's last block computes only the CLS row, as ViT.forward does
            h = block(h, cls_only=self.head is not None and self.pool == "cls" and i == last)
        if self.head is not None:
            return self.head(pool_rows(h, self.pool))  # (B, classes)
        return h  # (B, T, D)


def _serve(rank: int, world_size: int, port: int, threads: int, commands, results) -> None:
    """One pipeline process: join the group, then run commands until told to stop."""
    from torch.distributed.pipelining import PipelineStage, ScheduleGPipe

    from layerpar.config import ModelConfig

    torch.set_num_threads(threads)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    # blocks until every rank joins
    dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=timedelta(seconds=120))
    try:
        while True:
            cmd = commands.get()
            if cmd["op"] == "stop":
                return
            mcfg = ModelConfig(**cmd["model"])
            vit = ViT(mcfg, seed=cmd["seed"]).eval()
            lo, hi = stage_bounds(len(vit.blocks), world_size)[rank]
            stage = PipelineStage(ViTStage(vit, lo, hi), rank, world_size, torch.device("cpu"))
            schedule = ScheduleGPipe(stage, cmd["micro_batches"])  # no loss_fn: forward only
            x = cmd.get("x")
            starts, ends, out = [], [], None
            go = torch.zeros(1, dtype=torch.int32)
            begun = time.perf_counter()
            with torch.no_grad():
                for i in range(cmd["warmup"] + cmd["reps"]):
                    if rank == 0:  # rank 0 decides whether another repetition fits the time budget
                        timed = i - cmd["warmup"]
                        spent = time.perf_counter() - begun
                        go[0] = int(timed < cmd["min_reps"] or spent < cmd["max_seconds"])
                    dist.broadcast(go, src=0)  # blocks until every rank is here: all start together
                    if not go[0]:
                        break
                    if i == cmd["warmup"]:
                        begun = time.perf_counter()
                    t0 = time.perf_counter()
                    out = schedule.step(x) if rank == 0 else schedule.step()
                    t1 = time.perf_counter()
                    if i >= cmd["warmup"]:
                        starts.append(t0)
                        ends.append(t1)
            results.put({"rank": rank, "starts": starts, "ends": ends,
                         "logits": out if rank == world_size - 1 else None})
    except Exception as exc:  # noqa: BLE001 - reported to the driver as one sentence
        results.put({"rank": rank, "error": f"{type(exc).__name__}: {exc}"})
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PipelinePool:
    """W long-lived processes forming one gloo group; each `run` builds the stages of a ViT afresh."""

    def __init__(self, world_size: int, *, threads: int = 1, timeout_s: float = 300.0):
        ctx = mp.get_context("spawn")
        self.world_size, self.timeout_s = world_size, timeout_s
        port = _free_port()
        self.results = ctx.Queue()
        self.commands = [ctx.Queue() for _ in range(world_size)]
        self.procs = [ctx.Process(target=_serve, args=(r, world_size, port, threads, self.commands[r],
                                                       self.results), daemon=True)
                      for r in range(world_size)]
        for p in self.procs:
            p.start()

    def run(self, model: dict, *, seed: int, x: torch.Tensor, micro_batches: int, warmup: int,
            reps: int, min_reps: int = 3, max_seconds: float = 10.0
            ) -> tuple[torch.Tensor, list[float]]:
        """Logits of the ViT described by `model` (a ModelConfig as a dict) on x, and the latency of
        each timed repetition in seconds (rank 0's start to the last stage's end)."""
        if x.shape[0] % micro_batches:
            raise ValueError(f"batch {x.shape[0]} does not split into {micro_batches} micro-batches")
        cmd = {"op": "run", "model": model, "seed": seed, "micro_batches": micro_batches,
               "warmup": warmup, "reps": reps, "min_reps": min_reps, "max_seconds": max_seconds}
        for r, q in enumerate(self.commands):
            q.put({**cmd, "x": x.contiguous()} if r == 0 else cmd)
        got = {}
        deadline = time.monotonic() + self.timeout_s
        while len(got) < self.world_size:
            try:
                msg = self.results.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                raise RuntimeError(f"pipeline of {self.world_size} stages did not finish within "
                                   f"{self.timeout_s:g}s") from None
            if "error" in msg:
                raise RuntimeError(f"pipeline stage {msg['rank']} failed: {msg['error']}")
            got[msg["rank"]] = msg
        first, last = got[0], got[self.world_size - 1]
        samples = [end - start for start, end in zip(first["starts"], last["ends"], strict=True)]
        return last["logits"], samples

    def close(self) -> None:
        for q in self.commands:
            try:
                q.put({"op": "stop"})
            except (ValueError, OSError):
                pass
        for p in self.procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
        self.procs = []
