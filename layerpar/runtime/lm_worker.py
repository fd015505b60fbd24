"""The decoding worker: a Ray actor holding some of a causal LM's blocks and their key/value caches,
answering decode requests in a long-running loop fed over the same-node fast path (runtime/
fastpath.py: a Unix socket per worker, no Ray call per token). The driver is runtime/lm_decode.py.

Two kinds of shard, both a local copy of the model with only its own blocks:
- `branches` (the Para-Former LM): branches start..stop-1 of N, every one reading x0, which this
  worker computes itself from the tokens (it holds the embedding); a request returns the sum of its
  branches' last-position hidden rows (B, D). With `reduce: group` (NCCL on GPUs) the W workers sum
  those over their process group instead and worker 0 applies norm + head: it returns (B, V) logits.
- `stage` (the serial GPT pipelined for the baseline): blocks start..stop-1 of the serial stack; the
  first stage embeds the tokens, every stage maps the hidden state it is sent to the next one.

Slot bookkeeping is mirrored: every request carries the allocations and frees the driver made since
its last request (`ops`), applied here in the same order, so every worker's KVCache hands out the same
slot numbers as the driver without a round trip per allocation.
"""

from __future__ import annotations

import os
import re
from dataclasses import replace

import numpy as np
import ray
import torch

from layerpar.model.lm import LMConfig, ParaFormerLM, SerialLM
from layerpar.parallel import process_group
from layerpar.parallel.comm import GroupComm
from layerpar.parallel.layout import BranchLayout
from layerpar.runtime import fastpath


def local_state(state: dict, kind: str, start: int, stop: int) -> dict:
    """The entries of a full model's state dict that a shard holds, renumbered from 0: the
    embedding, positions, final norm and head, and branches (or serial blocks) start..stop-1."""
    prefix = "branches" if kind == "branches" else "blocks"
    pattern = re.compile(rf"{prefix}\.(\d+)\.(.*)")
    out = {}
    for key, value in state.items():
        m = pattern.fullmatch(key)
        if m is None:
            out[key] = value
        elif start <= int(m.group(1)) < stop:
            out[f"{prefix}.{int(m.group(1)) - start}.{m.group(2)}"] = value
    return out


def build_shard(cfg: LMConfig, state: dict, kind: str, start: int, stop: int):
    """A model holding only the shard's blocks, loaded (strictly) from `state`, the shard's entries
    as local_state() returns them (the driver sends each worker only those)."""
    if kind == "branches":
        local = ParaFormerLM(replace(cfg, num_branches=stop - start))
    else:
        local = SerialLM(replace(cfg, num_branches=1, branch_depth=stop - start))
    local.load_state_dict(state, strict=True)
    return local.eval()


class LMWorker:
    def __init__(self, spec: dict, state: dict, slots: int, threads: int):
        torch.set_num_threads(threads)
        self.gpu = bool(spec.get("gpu"))
        if self.gpu:  # Ray sets CUDA_VISIBLE_DEVICES: this worker's GPU is device 0
            torch.cuda.set_device(0)
        self.device = torch.device("cuda", 0) if self.gpu else torch.device("cpu")
        self.kind, self.rank, self.reduce = spec["kind"], spec["rank"], spec.get("reduce", "driver")
        self.start, self.stop = spec["start"], spec["stop"]
        self.layout = BranchLayout(spec["num_branches"], spec["workers"]) if self.kind == "branches" else None
        self.model = build_shard(LMConfig(**spec["cfg"]), state, self.kind, self.start, self.stop)
        self.model.to(self.device)
        self.cache = self.model.new_cache(slots, device=self.device)
        self.comm: GroupComm | None = None

    # ---------------------------------------------------------------- process group (reduce: group)

    def offer_rendezvous(self, same_node: bool) -> tuple[str, int, str | None]:
        ip = ray.util.get_node_ip_address()
        return ip, process_group.free_port(ip), process_group.new_init_file() if same_node else None

    def join_group(self, addr: str, port: int, world: int, init_file: str | None, timeout_s: float) -> None:
        process_group.set_env(master_addr=addr, master_port=port, rank=self.rank, world_size=world,
                              init_file=init_file)
        process_group.init_from_env(timeout_s=timeout_s, device=self.device)
        self.comm = GroupComm(self.layout)

    # ---------------------------------------------------------------- the loop

    def serve_fast(self, path: str, rank: int, key: bytes) -> int:
        """Answer decode requests from the driver's socket on this (default) thread until stopped."""
        return fastpath.serve(path, rank, key, self.handle)

    def handle(self, op: str, ops: list, *args) -> tuple:
        self._mirror(ops)
        if op == "sync":
            return (self.cache.num_used,)
        if op == "run":
            return (self._run(*args),)
        if op == "stage":
            return (self._stage(*args),)
        raise ValueError(f"unknown decode request {op!r}")

    def _mirror(self, ops: list) -> None:
        for what, slot in ops:
            if what == "alloc":
                got = self.cache.allocate()
                if got != slot:
                    raise RuntimeError(f"slot bookkeeping diverged: the driver allocated {slot}, "
                                       f"worker {self.rank} {got}")
            else:
                self.cache.free(slot)

    @torch.no_grad()
    def _advance(self, slots: list[int], x: torch.Tensor | list, k: int | None, embed: bool):
        """Append one rectangular chunk to `slots`: (index, starts, input rows (B, T, D))."""
        t = len(x[0]) if embed else x.shape[1]
        index = self.cache.check(slots, t, k)
        starts = self.cache.lengths[index]
        if embed:
            x = self.model.embed(torch.tensor(x, dtype=torch.long, device=self.device), starts)
        return index, starts, x

    @torch.no_grad()
    def _run(self, chunks: list[tuple[list[int], list[list[int]]]], k: int) -> np.ndarray | None:
        """Para-Former shard: for each chunk (slots, tokens (B, T)), this worker's branches below k
        over the new positions; the sum of their last-position rows, (rows of all chunks, D). Then the
        reduction: returned to the driver, or (reduce: group) summed over the group onto worker 0,
        which returns the (rows, V) logits."""
        kw = sum(1 for b in range(self.start, self.stop) if b < k)
        parts = []
        for slots, tokens in chunks:
            if kw == 0:  # a prefix model without this worker's branches: its caches stay untouched
                continue
            index, starts, x0 = self._advance(slots, tokens, kw, embed=True)
            rows = self.model.branch_outputs(x0, kw, cache=self.cache, slots=index, starts=starts)
            self.cache.lengths[index] += x0.shape[1]
            parts.append(rows[:, :, -1].sum(dim=0))  # (B, D): the model's trunk sum, last position
        if self.reduce != "group":
            return None if not parts else torch.cat(parts).cpu().numpy()
        rows_total = sum(len(slots) for slots, _ in chunks)
        partial = torch.cat(parts) if parts else torch.zeros(
            rows_total, self.model.cfg.dim, dtype=self.model.tok.dtype, device=self.device)
        y = self.comm.reduce_to_leader(partial)
        return None if y is None else self.model.logits(y[:, None])[:, 0].cpu().numpy()

    @torch.no_grad()
    def _stage(self, chunks: list, first: bool, last: bool) -> list[np.ndarray]:
        """Serial stage: for each chunk (slots, tokens or hidden (B, T, D)), this stage's blocks over
        the new positions; the hidden state (B, T, D) for the next stage (the last: (B, D), last
        position only)."""
        out = []
        for slots, x in chunks:
            x = x if first else torch.from_numpy(x).to(self.device)
            index, starts, h = self._advance(slots, x, None, embed=first)
            h = self.model.trunk(h, cache=self.cache, slots=index, starts=starts)
            self.cache.lengths[index] += h.shape[1]
            out.append((h[:, -1] if last else h).cpu().numpy())
        return out

    # ---------------------------------------------------------------- side thread

    @ray.method(concurrency_group="side")
    def ping(self) -> int:
        return os.getpid()

    @ray.method(concurrency_group="side")
    def where(self) -> dict:
        return {"node_id": ray.get_runtime_context().get_node_id(), "pid": os.getpid(),
                "gpu_ids": ray.get_gpu_ids()}


# The side group answers heartbeats while the default thread runs the decode loop.
RemoteLMWorker = ray.remote(concurrency_groups={"side": 1})(LMWorker)
