"""Decoding a causal LM across W workers: the `Decoder` of runtime/decoder.py over Ray actors.

    decoder = DistributedDecoder(model, slots=8, parallel=ParallelConfig(workers=2))
    slot = decoder.allocate()
    logits = decoder.prefill([slot], [prompt])       # (1, V)
    logits = decoder.step([slot], [next_token])      # (1, V), one position
    decoder.free(slot); decoder.close()

`DistributedDecoder` (the Para-Former LM): worker w owns a contiguous block of branches
(parallel/layout.py BranchLayout) and those branches' key/value caches for every slot. One step: the
new tokens reach every worker once (one request on each worker's fast-path socket: no Ray call per
token); each embeds them itself and runs one position of its branches (the fused cached stack); one
reduction brings the summed (B, D) to where the final norm and the head are applied:
- `reduce: driver` (the default on CPU): each worker's reply carries its branch sum (B, D), which
  the driver adds in rank order and turns into logits. The reply is needed anyway (it is how the
  driver learns the step is done), so the reduction costs no extra message: a gloo collective
  costs ~0.5-1 ms here (estimated, not benchmarked) against a socket round trip of tens of microseconds.
- `reduce: group` (the default with parallel.gpus_per_worker > 0 and W > 1): the workers form a
  torch.distributed group (NCCL on GPUs, gloo on CPU) and reduce the (B, D) sums onto worker 0,
  which applies norm + head on its GPU and returns (B, V) logits; the others reply only "done".

Why the fast path and not a leader loop over torch.distributed: the driver must hear from every
worker on every step anyway (a SIGKILLed worker's socket closes at once: WorkerError within
milliseconds, and the heartbeat catches a stopped one within parallel.heartbeat_s), and the fast
path (runtime/fastpath.py: key-checked Unix sockets, heartbeats) already exists for inference. It
needs every worker on the driver's node; a multi-node decoder is not built.

`PipelinedDecoder` (the serial GPT baseline of the `--preset lm` study): the serial stack split
into W consecutive stages, one per worker; a step sends the tokens to stage 0 and each stage's hidden
state (B, 1, D) through the driver to the next (W sequential socket round trips), then the driver
applies the head.

Slots: allocate/free are bookkept on the driver (the same lowest-free-first rule as KVCache) and
mirrored on every worker with the next request. After a worker is lost the decoder is broken: every
later call raises WorkerError (free() still succeeds, so callers can release their slots).
"""

from __future__ import annotations

import dataclasses
import threading
import uuid

import numpy as np
import ray
import torch

from layerpar.config import ParallelConfig
from layerpar.model.lm import LMConfig, ParaFormerLM, SerialLM
from layerpar.model.lm_cache import CacheError
from layerpar.parallel.layout import BranchLayout
from layerpar.runtime.errors import WorkerError
from layerpar.runtime.fastpath import MAX_REQUEST_BYTES, FastPath, FastPathError
from layerpar.runtime.lm_worker import RemoteLMWorker, local_state
from layerpar.runtime.placement import bundle_strategy, place_workers, release
from layerpar.runtime.transport import driver_node


def _kill(handle) -> None:
    try:
        ray.kill(handle, no_restart=True)
    except Exception:  # noqa: BLE001 - already gone
        pass


class _Pool:
    """W decoding actors in one placement group, optionally a process group among them, and the
    fast path that feeds their loops. `call` turns every way a worker can be lost into WorkerError."""

    def __init__(self, specs: list[dict], state: dict, slots: int, parallel: ParallelConfig, group: bool):
        """state: the whole model's; each worker is sent only its shard's entries (lm_worker.py)."""
        p = dataclasses.replace(parallel, workers=len(specs))
        self.tag = uuid.uuid4().hex[:8]
        self.workers: list = []
        self.fast: FastPath | None = None
        self.broken: str | None = None
        startup_s = p.placement_timeout_s + p.timeout_s
        self.pg = place_workers(p)
        try:
            self.workers = [RemoteLMWorker.options(
                num_cpus=p.cpus_per_worker, num_gpus=p.gpus_per_worker,
                scheduling_strategy=bundle_strategy(self.pg, rank),
                name=f"layerpar-lm-{self.tag}-w{rank}",
            ).remote(spec, local_state(state, spec["kind"], spec["start"], spec["stop"]), slots,
                     p.threads_per_worker) for rank, spec in enumerate(specs)]
            where = self._get([w.where.remote() for w in self.workers], startup_s)
            here = driver_node()
            if any(info["node_id"] != here for info in where):
                raise WorkerError("distributed decoding needs every worker on the driver's node (the "
                                  "same-node fast path); a multi-node decoder is not built")
            self.pids = [info["pid"] for info in where]
            if group and len(specs) > 1:
                addr, port, init_file = self._get(self.workers[0].offer_rendezvous.remote(True), startup_s)
                self._get([w.join_group.remote(addr, port, len(specs), init_file, p.timeout_s)
                           for w in self.workers], startup_s)
            try:
                self.fast = FastPath(self.workers, timeout_s=p.call_timeout_s, startup_timeout_s=startup_s,
                                     heartbeat_s=p.heartbeat_s, tag=f"lm-{self.tag}")
            except FastPathError as exc:
                raise WorkerError(f"the decoding workers' fast path did not start: {exc}") from None
        except BaseException:
            self.close()
            raise

    @staticmethod
    def _get(refs, timeout_s: float):
        try:
            return ray.get(refs, timeout=timeout_s)
        except ray.exceptions.GetTimeoutError:
            raise WorkerError(f"a decoding worker did not start within {timeout_s:g}s") from None
        except ray.exceptions.RayActorError as exc:
            raise WorkerError(f"a decoding worker died: {str(exc).splitlines()[0]}") from None

    def call(self, ranks, msg: tuple) -> list:
        """The ranks' replies to msg (each the handler's result); WorkerError when one is lost."""
        if self.broken is not None:
            raise WorkerError(f"the decoder lost a worker earlier ({self.broken}); make a new one")
        try:
            replies = self.fast.call(ranks, msg)
        except FastPathError as exc:  # PeerLost (died, stopped) or the call deadline
            self.broken = str(exc)
            raise WorkerError(f"a decoding worker was lost: {exc}") from None
        for rank, reply in zip(ranks, replies, strict=True):
            if reply[0] != "ok":
                self.broken = reply[1]  # the workers may now disagree on their caches: stop here
                if reply[2]:  # a failed collective: a peer died or hung
                    raise WorkerError(f"a collective failed on decoding worker {rank}: {reply[1]}")
                raise RuntimeError(f"decoding worker {rank} failed: {reply[1]}")
        return [reply[1] for reply in replies]

    def close(self) -> None:
        if self.fast is not None:
            self.fast.close(wait_s=0)
            self.fast = None
        for w in self.workers:
            _kill(w)
        self.workers = []
        release(self.pg)
        self.pg = None


class _SlotBook:
    """The driver's view of every slot: handed out, length, branches its history covers; and the
    allocations/frees every worker has yet to mirror."""

    def __init__(self, slots: int, context: int, branches: int):
        self.capacity, self.context, self.branches = slots, context, branches
        self.free_list = list(range(slots))
        self.length = [0] * slots
        self.filled = [branches] * slots
        self.handed: set[int] = set()
        self.pending: list[tuple[str, int]] = []

    def allocate(self) -> int:
        if not self.free_list:
            raise CacheError(f"no free cache slot: all {self.capacity} slots are in use")
        slot = self.free_list.pop(0)
        self.handed.add(slot)
        self.length[slot], self.filled[slot] = 0, self.branches
        self.pending.append(("alloc", slot))
        return slot

    def free(self, slot: int) -> None:
        if slot in self.handed:
            self.handed.remove(slot)
            self.free_list.append(slot)
            self.free_list.sort()
            self.length[slot] = 0
            self.pending.append(("free", slot))

    def check(self, slots: list[int], sizes: list[int], k: int) -> None:
        """KVCache.check's rules, before anything is sent: allocated, room left, one k per life."""
        if len(set(slots)) != len(slots):
            raise CacheError(f"a decoding step names a cache slot twice: {list(slots)}")
        for s, n in zip(slots, sizes, strict=True):
            if s not in self.handed:
                raise CacheError(f"cache slot {s} is not allocated")
            if n < 1:
                raise CacheError("a prompt needs at least one token")
            if self.length[s] + n > self.context:
                raise CacheError(f"{n} new tokens after {self.length[s]} do not fit the context of "
                                 f"{self.context} tokens (slot {s})")
            if self.length[s] and k > self.filled[s]:
                raise CacheError(f"slot {s} was decoded with {self.filled[s]} branches; it cannot "
                                 f"continue with {k} (their caches lack its history)")

    def advance(self, slots: list[int], sizes: list[int], k: int) -> None:
        for s, n in zip(slots, sizes, strict=True):
            self.filled[s] = k if not self.length[s] else min(self.filled[s], k)
            self.length[s] += n

    def take_ops(self) -> list[tuple[str, int]]:
        ops, self.pending = self.pending, []
        return ops


def _chunks(slots: list[int], prompts: list[list[int]]) -> list[tuple[list[int], list[list[int]]]]:
    """Prompts grouped by length into rectangular chunks (one cached step each), in order of first
    appearance: (slots, tokens (B, T)) each."""
    by_len: dict[int, tuple[list[int], list[list[int]]]] = {}
    for s, p in zip(slots, prompts, strict=True):
        group = by_len.setdefault(len(p), ([], []))
        group[0].append(s)
        group[1].append([int(t) for t in p])
    return list(by_len.values())


class _DecoderBase:
    """The Decoder protocol's bookkeeping shared by both decoders; subclasses define `_compute`."""

    def __init__(self, model, slots: int):
        if not isinstance(slots, int) or isinstance(slots, bool) or slots < 1:
            raise CacheError(f"a decoder needs at least one slot, got {slots!r}")
        cfg: LMConfig = model.cfg
        self.cfg, self.slots, self.context, self.vocab = cfg, slots, cfg.context, cfg.vocab
        self.book = _SlotBook(slots, cfg.context, self.num_branches)
        self.model = model.eval()  # the driver's copy: its final norm and head
        self.exact_logits = False  # True: logits in the model's dtype (float64 tests), not float32
        self._lock = threading.Lock()
        self.pool: _Pool | None = None

    def _k(self, num_branches: int | None) -> int:
        k = self.num_branches if num_branches is None else num_branches
        if not isinstance(k, int) or not 1 <= k <= self.num_branches:
            raise CacheError(f"num_branches must be in 1..{self.num_branches}, got {num_branches}")
        return k

    def allocate(self) -> int:
        with self._lock:
            return self.book.allocate()

    def free(self, slot: int) -> None:
        with self._lock:
            self.book.free(slot)

    def num_used(self) -> int:
        with self._lock:
            return len(self.book.handed)

    def length(self, slot: int) -> int:
        with self._lock:
            return self.book.length[slot]

    def prefill(self, slots: list[int], prompts: list[list[int]], num_branches: int | None = None
                ) -> torch.Tensor:
        if len(slots) != len(prompts):
            raise CacheError(f"{len(prompts)} prompts for {len(slots)} cache slots")
        return self._decode(list(slots), [list(p) for p in prompts], num_branches)

    def step(self, slots: list[int], tokens: list[int], num_branches: int | None = None) -> torch.Tensor:
        if len(slots) != len(tokens):
            raise CacheError(f"{len(tokens)} tokens for {len(slots)} cache slots")
        return self._decode(list(slots), [[t] for t in tokens], num_branches)

    def _decode(self, slots: list[int], rows: list[list[int]], num_branches: int | None) -> torch.Tensor:
        k = self._k(num_branches)
        if not slots:
            raise CacheError("a decoding step needs at least one slot")
        if any(not 0 <= int(t) < self.vocab for r in rows for t in r):
            raise CacheError(f"a token id is outside the vocabulary of {self.vocab}")
        with self._lock:
            if self.pool is None:
                raise WorkerError("the decoder is closed")
            self.book.check(slots, [len(r) for r in rows], k)
            chunks = _chunks(slots, rows)
            order = [s for c_slots, _ in chunks for s in c_slots]
            out = self._compute(chunks, k, self.book.take_ops())  # (B, V) in `order`
            self.book.advance(slots, [len(r) for r in rows], k)
        out = out[[order.index(s) for s in slots]]
        return out if self.exact_logits else out.float()

    def _head(self, y: np.ndarray) -> torch.Tensor:
        """The summed last hidden rows (B, D) -> logits (B, V): final norm + head, on the driver."""
        with torch.no_grad():
            return self.model.logits(torch.from_numpy(y).to(self.model.tok.device)[:, None])[:, 0]

    def worker_slots_used(self) -> list[int]:
        """Every worker's count of allocated cache slots (mirrors num_used once synced)."""
        with self._lock:
            ops = self.book.take_ops()
            return self.pool.call(range(len(self.pool.workers)), ("lm", "sync", ops))

    def worker_pids(self) -> list[int]:
        return list(self.pool.pids)

    def close(self) -> None:
        with self._lock:
            if self.pool is not None:
                self.pool.close()
                self.pool = None
            for slot in sorted(self.book.handed):
                self.book.free(slot)


class DistributedDecoder(_DecoderBase):
    """The Para-Former LM's branches over parallel.workers Ray actors (see the module docstring)."""

    def __init__(self, model: ParaFormerLM, slots: int, parallel: ParallelConfig | None = None, *,
                 reduce: str = "auto"):
        if not isinstance(model, ParaFormerLM):
            raise TypeError("DistributedDecoder decodes a ParaFormerLM (a SerialLM: PipelinedDecoder)")
        parallel = parallel or ParallelConfig(workers=1)
        self.num_branches = model.cfg.num_branches
        super().__init__(model, slots)
        w = max(parallel.workers, 1)
        self.layout = BranchLayout(self.num_branches, w)  # a clear ValueError for W > N
        gpu = parallel.gpus_per_worker > 0
        if reduce == "auto":
            reduce = "group" if gpu and w > 1 else "driver"
        if reduce not in ("driver", "group"):
            raise ValueError(f"reduce must be auto, driver or group, got {reduce!r}")
        self.reduce = reduce
        specs = [{"kind": "branches", "rank": r, "start": self.layout.owned(r).start,
                  "stop": self.layout.owned(r).stop, "num_branches": self.num_branches, "workers": w,
                  "reduce": reduce, "gpu": gpu, "cfg": dataclasses.asdict(model.cfg)} for r in range(w)]
        state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        self.pool = _Pool(specs, state, slots, parallel, group=reduce == "group")

    @classmethod
    def from_state(cls, cfg: LMConfig, state: dict, slots: int, parallel: ParallelConfig | None = None,
                   **kw) -> DistributedDecoder:
        """From a checkpoint's model state dict (what a loader such as load_lm hands over)."""
        model = ParaFormerLM(cfg)
        model.load_state_dict(state, strict=True)
        return cls(model, slots, parallel, **kw)

    def _compute(self, chunks, k: int, ops) -> torch.Tensor:
        # every worker gets every request (a worker without branches below k only mirrors slots), so
        # every worker is heard from on every step: a lost one is noticed on the next token
        ranks = range(self.layout.num_workers)
        replies = self.pool.call(ranks, ("lm", "run", ops, chunks, k))
        if self.reduce == "group":
            return torch.from_numpy(replies[0])
        parts = [r for r in replies if r is not None]  # rank order
        total = parts[0]
        for part in parts[1:]:
            total = total + part
        return self._head(total)


class PipelinedDecoder(_DecoderBase):
    """The serial GPT split into parallel.workers consecutive stages (the study's baseline)."""

    def __init__(self, model: SerialLM, slots: int, parallel: ParallelConfig | None = None):
        if not isinstance(model, SerialLM):
            raise TypeError("PipelinedDecoder decodes a SerialLM")
        parallel = parallel or ParallelConfig(workers=1)
        self.num_branches = 1
        super().__init__(model, slots)
        depth = model.cfg.num_branches * model.cfg.branch_depth
        stages = BranchLayout(depth, max(parallel.workers, 1))  # blocks per stage, balanced
        gpu = parallel.gpus_per_worker > 0
        specs = [{"kind": "stage", "rank": r, "start": stages.owned(r).start, "stop": stages.owned(r).stop,
                  "gpu": gpu, "cfg": dataclasses.asdict(model.cfg)} for r in range(stages.num_workers)]
        state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        self.pool = _Pool(specs, state, slots, parallel, group=False)

    def _k(self, num_branches: int | None) -> int:
        return 1  # a serial stack has no branches to choose from

    def _compute(self, chunks, k: int, ops) -> torch.Tensor:
        # a long prefill goes through the stages in pieces of positions (appending to a cache in
        # pieces is the same computation), so each stage's request stays under the fast path's bound
        item = torch.finfo(self.model.tok.dtype).bits // 8
        finals = []
        for slots, tokens in chunks:
            span = max(1, (MAX_REQUEST_BYTES // 4) // (len(slots) * self.cfg.dim * item))
            for start in range(0, len(tokens[0]), span):
                piece = [(slots, [row[start:start + span] for row in tokens])]
                piece_ops, ops = ops, []  # slot changes ride with the first request only
                piece_final = self._through_stages(piece, piece_ops)
            finals.append(piece_final)
        return self._head(np.concatenate(finals))

    def _through_stages(self, chunks, ops) -> np.ndarray:
        last = len(self.pool.workers) - 1
        for rank in range(last + 1):
            (outs,) = self.pool.call([rank], ("lm", "stage", ops, chunks, rank == 0, rank == last))
            chunks = [(slots, h) for (slots, _), h in zip(chunks, outs, strict=True)]
        return chunks[0][1]  # the last stage's (B, D)
