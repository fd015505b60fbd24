"""The engine the driver uses: W branch workers on Ray, one broadcast, one reduce.

    with Engine(cfg, total_steps=1000) as engine:
        logits = engine.infer(x)                 # x (B, C, H, W) float32
        engine.train_step(x, y)
        engine.save("runs/x/checkpoints/step_0000001", epoch=1)

Inference: the driver hands every worker the same one copy of the batch and sends every request
before awaiting any reply (runtime/transport.py: a shared-memory slot and the socket fast path when
every worker shares its node, else the object store and one Ray call per worker). With the
`collective` transport rank 0 gathers every worker's pooled branch rows (K_w, B, D) inside the
worker group, adds all of them in branch order (ordered_sum: the single-process model's additions)
and applies the head; with `object_store` each worker returns its rows (K_w, B, D) and the driver
concatenates them into (K, B, D) and adds them in the same branch order before its head.

Faults (docs/FAILURES.md): a worker that dies or does not answer within parallel.timeout_s is noticed
by the call that needed it; a background Recovery (runtime/recovery.py) restarts it in its bundle,
restores its weights from the engine's object-store snapshot and re-forms the group, and idempotent
calls (infer, prefix_logits, state reads) are retried. serve.degraded=wait blocks calls until then;
serve.degraded=allow answers infer_with_meta from the surviving branches meanwhile, marked degraded.
A training step is not retried: it raises WorkerError and the run restarts from its last checkpoint
(layerpar.runtime.restart).
"""

from __future__ import annotations

import operator
import threading
import time
import uuid

import ray
import torch

from layerpar.config import Config
from layerpar.model.overflow import check_finite_logits
from layerpar.model.paraformer import make_head, ordered_sum, prefix_sums
from layerpar.parallel.cluster import ClusterError, connect
from layerpar.parallel.comm import failed_collective
from layerpar.parallel.layout import BranchLayout
from layerpar.runtime.heartbeat import Heartbeat, WorkerSilent
from layerpar.runtime.placement import bundle_strategy, place_workers, release
from layerpar.runtime.recovery import MAX_TRIES, FaultHandling, Restore, WorkerError, kill
from layerpar.runtime.transport import Transport, broadcast_ref, merge_timings
from layerpar.runtime.worker import RemoteBranchWorker, as_tensor

__all__ = ["ClusterError", "Engine", "WorkerError", "connect"]


class Engine(FaultHandling):
    def __init__(self, cfg: Config, *, total_steps: int = 0, checkpoint: str | None = None):
        if cfg.parallel.workers < 1:
            raise ValueError("Engine needs parallel.workers >= 1; use LocalBackend for a single process")
        if cfg.model.kind != "paraformer":
            raise ValueError(f"Engine runs Para-Formers; model.kind is {cfg.model.kind!r}")
        self.cfg, self.total_steps = cfg, total_steps
        self.layout = BranchLayout(cfg.model.num_branches, cfg.parallel.workers)
        self.collective = cfg.parallel.transport == "collective"
        self.timeout_s = cfg.parallel.timeout_s  # training, loads, state reads, the gloo group
        self.call_timeout_s = cfg.parallel.call_timeout_s  # one inference call, all ranks together
        self.heartbeat_s = cfg.parallel.heartbeat_s  # a worker silent this long is lost
        # starting an actor imports torch and builds its branches: allowed longer than one call
        self.startup_timeout_s = cfg.parallel.placement_timeout_s + cfg.parallel.timeout_s
        self.allow_degraded = cfg.serve.degraded == "allow"
        self.last_timings: dict[str, float] = {}
        self.last_bytes: dict[str, int] = {}
        self._head: torch.nn.Module | None = None  # driver copy of the head (object_store, evaluation)
        self._pg = None
        self.workers: list = []
        self.placement: list[dict] = []
        self.id = uuid.uuid4().hex[:8]  # names the actors: layerpar-<id>-w<rank>.<generation>
        self._generation = 0
        # Collectives must start in the same order on every worker: tasks submitted to several
        # workers are submitted under this lock, so two threads' calls never interleave.
        self._submit_lock = threading.Lock()
        self._init_faults()  # runtime/recovery.py
        self._owns_ray = connect(cfg)
        self._transport = Transport(cfg.parallel, tag=self.id, timeout_s=self.call_timeout_s,
                                    startup_timeout_s=self.startup_timeout_s)
        try:
            self._pg = place_workers(cfg.parallel)
            self._start_workers()
            if checkpoint is not None:
                self.load(checkpoint)
        except BaseException:
            self.shutdown()
            raise

    # ------------------------------------------------------------------ lifecycle

    def _new_worker(self, rank: int):
        """Start the actor for `rank` in its own bundle (a restarted worker gets the same bundle)."""
        p = self.cfg.parallel
        self._generation += 1
        return RemoteBranchWorker.options(
            num_cpus=p.cpus_per_worker, num_gpus=p.gpus_per_worker,
            scheduling_strategy=bundle_strategy(self._pg, rank),
            name=f"layerpar-{self.id}-w{rank}.{self._generation}",  # launch/chaos.py finds it by name
        ).remote(self.cfg.to_dict(), rank, self.total_steps)

    def _start_workers(self) -> None:
        self.workers = [self._new_worker(rank) for rank in range(self.layout.num_workers)]
        self.placement = self._get([w.where.remote() for w in self.workers], self.startup_timeout_s)
        if self.collective and len(self.workers) > 1:
            self._form_group()

    def _form_group(self) -> None:
        """Ray Train's rendezvous: rank 0 offers an address and a free port, every rank joins at once,
        and the driver waits on all of them together."""
        same_node = len({p["node_id"] for p in self.placement}) == 1  # a file rendezvous, loopback only
        addr, port, init_file = self._get(self.workers[0].offer_rendezvous.remote(same_node),
                                          self.startup_timeout_s)
        world = len(self.workers)
        self._get([w.join_group.remote(addr, port, world, init_file) for w in self.workers],
                  self.startup_timeout_s)

    def shutdown(self) -> None:
        with self._lock:
            self._closed = True
            rec = self._recovery
        if rec is not None:  # let a nearly done recovery finish; a later one kills what it started
            rec.done.wait(5.0)
        self._transport.close()
        for w in self.workers:
            kill(w)
        self.workers = []
        self._snapshot = None
        release(self._pg)
        self._pg = None
        if self._owns_ray and ray.is_initialized():
            ray.shutdown()
        self._owns_ray = False

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()

    def _get(self, refs, timeout_s: float | None = None, *, watch: list | None = None,
             field: str = "parallel.timeout_s"):
        """ray.get with the engine's timeout; a dead or silent worker, or a collective that failed
        because of one, becomes a WorkerError. With `watch` (the worker behind each of `refs`), a
        worker that misses its heartbeat ends the wait at once (runtime/heartbeat.py)."""
        timeout_s = timeout_s or self.timeout_s
        try:
            if watch is not None:
                self._wait_watched(refs, watch, time.monotonic() + timeout_s)
            return ray.get(refs, timeout=timeout_s if watch is None else 0.1)
        except WorkerSilent as exc:
            raise WorkerError(str(exc)) from None
        except ray.exceptions.GetTimeoutError:
            raise WorkerError(f"a worker did not answer within {field}={timeout_s:g}s") from None
        except ray.exceptions.RayActorError as exc:
            raise WorkerError(f"a branch worker died: {str(exc).splitlines()[0]}") from None
        except ray.exceptions.RayTaskError as exc:
            if not failed_collective(exc.cause):
                raise
            raise WorkerError(f"a collective failed (a peer died or hung): "
                              f"{str(exc.cause).splitlines()[0][:300]}") from None

    def _wait_watched(self, refs: list, workers: list, deadline: float) -> None:
        """Wait for refs[i] (from workers[i]) until every one is ready or failed, or the deadline."""
        beat = Heartbeat(workers, self.heartbeat_s)
        pending = list(refs)
        while pending and (left := deadline - time.monotonic()) > 0:
            _, pending = ray.wait(pending, num_returns=len(pending), timeout=min(left, beat.interval_s))
            beat.check(i for i, ref in enumerate(refs) if ref in pending)

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
        n = self.cfg.model.num_branches
        if num_branches is None:
            return n
        try:
            if isinstance(num_branches, bool):
                raise TypeError
            k = operator.index(num_branches)  # int, numpy or 0-d torch integers
        except TypeError:
            raise ValueError(f"num_branches must be an integer in 1..{n}, got {num_branches!r}") from None
        if not 1 <= k <= n:
            raise ValueError(f"num_branches ({k}) must be in 1..{n}")
        return k

    def infer(self, x: torch.Tensor, num_branches: int | None = None) -> torch.Tensor:
        """Logits (B, classes) of the prefix model with `num_branches` branches (default all).
        Only the workers that own one of those branches are called. A lost worker is recovered and
        the call retried (serve.degraded=allow: see infer_with_meta). Raises InputOverflow (a
        ValueError) when a row's values overflow the model; infer_with_meta returns the logits as
        computed, for callers that refuse per row (the server, per merged request)."""
        return check_finite_logits(self.infer_with_meta(x, num_branches)[0])

    def infer_with_meta(self, x: torch.Tensor, num_branches: int | None = None
                        ) -> tuple[torch.Tensor, dict]:
        """(logits, {"degraded": bool, "branches_used": [...]}). While a lost worker is being
        recovered, serve.degraded=wait waits for it; serve.degraded=allow answers at once from the
        surviving workers' branches (head of their sum, in branch order), marked degraded."""
        x, k = self.check_input(x), self._num_branches(num_branches)
        t0 = time.perf_counter()
        # one copy for every worker, and for every retry
        with self._transport.broadcast(x.numpy(), self.placement) as ref:
            broadcast_s = time.perf_counter() - t0
            last: WorkerError | None = None
            for _ in range(MAX_TRIES):
                rec = self._recovery
                if rec is not None and rec.active and self.allow_degraded:
                    out = self._degraded(rec, ref, k)
                    if out is not None:
                        return out
                try:
                    with self._dispatch() as workers:
                        logits = self._infer(workers, ref, x, k, broadcast_s)
                    return logits, {"degraded": False, "branches_used": list(range(k))}
                except WorkerError as exc:
                    last = exc
                    self._begin_recovery(str(exc))
            raise last

    def _infer(self, workers: list, ref, x: torch.Tensor, k: int, broadcast_s: float) -> torch.Tensor:
        if self._state is Restore.SNAPSHOT and self._snapshot is None:
            self._take_snapshot()  # first inference after training: what a restart would restore
        t1 = time.perf_counter()
        t0 = t1 - broadcast_s
        r = self.layout.participants(k)
        row_bytes = x.shape[0] * self.cfg.model.dim * 4  # one pooled (B, D) row of one branch
        outs = self._transport.fast_call(workers, self.placement, r, ("infer", ref, k, self.collective),
                                         reply_bytes=self.layout.max_owned * row_bytes)
        if outs is None:  # not all on this node (or a huge reply): one Ray call per worker
            with self._submit_lock:
                refs = [w.infer.remote(ref, k, self.collective) for w in workers[:r]]  # dispatch all
            outs = self._get(refs, self.call_timeout_s, watch=workers[:r],
                             field="parallel.call_timeout_s")  # ... then wait once
        t2 = time.perf_counter()
        if self.collective:
            logits, timings = as_tensor(outs[0][0]), merge_timings([o[1] for o in outs])
        else:
            rows = torch.cat([as_tensor(o[0]) for o in outs])  # (k, B, D) in branch order
            th = time.perf_counter()
            logits = self.head_module()(ordered_sum(rows))
            timings = {**merge_timings([o[1] for o in outs]),
                       "reduce": time.perf_counter() - t2, "head": time.perf_counter() - th}
        total_s = time.perf_counter() - t0
        worker_s = sum(timings.get(p, 0.0) for p in ("embed", "compute", "reduce", "head"))
        self.last_timings = {**timings, "broadcast": t1 - t0, "total": total_s,
                             "dispatch": max(0.0, total_s - (t1 - t0) - worker_s)}
        self.last_bytes = {"broadcast": x.numel() * 4, "reduce": r * self.layout.max_owned * row_bytes,
                           "result": logits.numel() * 4}
        return logits

    def _end_fast(self, reset: bool = False) -> None:
        """Give the workers' default threads back (before any other call that needs them); reset:
        a recovery's, which also lets the fast path start again for the workers it failed on."""
        self._transport.end_fast(reset)

    def _make_head(self, state: dict) -> torch.nn.Module:
        head = make_head(self.cfg.model, self.cfg.train.seed)
        head.load_state_dict({k.split(".", 1)[1]: v for k, v in state.items()})
        return head.eval().requires_grad_(False)

    def head_module(self) -> torch.nn.Module:
        """The driver's copy of the (replicated, small) head, fetched from rank 0 when stale."""
        if self._head is None:
            self._head = self._make_head(self._get(self.workers[0].head_piece.remote()))
        return self._head

    @torch.no_grad()
    def prefix_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of every prefix model k = 1..N in one pass: (N, B, classes)."""
        with self._transport.broadcast(self.check_input(x).numpy(), self.placement) as ref:

            def call(workers):
                outs = self._get([w.branch_outputs.remote(ref) for w in workers])
                rows = torch.cat([as_tensor(o) for o in outs])  # (N, B, D) in branch order
                return self.head_module()(prefix_sums(rows))

            return self._idempotent(call)

    def evaluate(self, split, batch_size: int = 256) -> dict:
        """Accuracy and loss of the full model and the accuracy of every prefix k = 1..N."""
        from layerpar.train.evaluate import evaluate

        return evaluate(self, split, batch_size)

    # ------------------------------------------------------------------ training

    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> dict:
        """One batch of optimizer steps on every worker (joint or progressive per train.mode).
        Not retried: a lost worker raises WorkerError (restart from the last checkpoint)."""
        if not self.collective and len(self.workers) > 1:
            raise ValueError("training needs parallel.transport=collective: gradients travel through "
                             "the workers' process group")
        x = self.check_input(x)
        y = torch.as_tensor(y, dtype=torch.int64)
        if y.shape != (x.shape[0],):
            raise ValueError(f"labels must have shape ({x.shape[0]},), got {tuple(y.shape)}")
        ref = broadcast_ref((x.numpy(), y.numpy()))  # broadcast once

        def call(workers):
            self._head = None  # the head moves
            self._state, self._snapshot = Restore.SNAPSHOT, None  # taken again before the next inference
            self._snapshot_checkpoint = None
            try:
                with self._submit_lock:
                    refs = [w.train_step.remote(ref) for w in workers]
                return self._get(refs, watch=workers)[0]
            except WorkerError:
                self._state = Restore.LOST  # the workers may have stepped unevenly: nothing to restore
                raise

        return self._not_retried(call)

    # ------------------------------------------------------------------ state

    def _collect(self, workers: list) -> tuple[dict, dict, int, list]:
        refs = [w.pieces.remote(True) for w in workers]
        outs = self._get(refs)
        pieces, optim = {}, {}
        for p, o, _ in outs:  # embed and head are replicated: every copy is the same
            pieces.update(p)
            optim.update(o)
        return pieces, optim, outs[0][2], refs

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The whole model's weights, gathered from the workers (the driver holds none between calls)."""
        pieces, _, _, _ = self._idempotent(self._collect)
        return {k: v for piece in pieces.values() for k, v in piece.items()}

    def save(self, path, *, epoch: int, extra: dict | None = None):
        from layerpar.train.checkpoint import save_checkpoint

        pieces, optim, step, refs = self._idempotent(self._collect)
        saved = save_checkpoint(path, pieces, config=self.cfg, step=step, epoch=epoch, optim=optim,
                                extra=extra)
        if self._state is not Restore.FRESH:
            self._take_snapshot(refs, checkpoint=saved)  # the refs stay in the object store
        return saved

    def load(self, path, *, weights_only: bool = False) -> dict:
        """Load a checkpoint written with any number of workers (or by a single process).
        weights_only (serving): the optimizer state is not read at all."""
        from layerpar.train.checkpoint import load_checkpoint

        ckpt = load_checkpoint(path, with_optim=not weights_only)
        step = int(ckpt.manifest.get("step", 0))
        wanted = {}
        for rank in range(self.layout.num_workers):
            wanted[rank] = ["embed", "head"] + [f"branch.{b}" for b in self.layout.owned(rank)]
            missing = [p for p in wanted[rank] if p not in ckpt.tensors]
            if missing:
                raise ValueError(f"checkpoint {path} lacks {', '.join(missing)} "
                                 f"(it holds {len(ckpt.tensors)} pieces)")

        def call(workers):
            refs = []
            for rank, w in enumerate(workers):
                pieces = {p: ckpt.tensors[p] for p in wanted[rank]}
                optim = {p: ckpt.optim[p] for p in wanted[rank] if p in (ckpt.optim or {})}
                refs.append(w.load.remote(pieces, optim or None, step))
            self._state = Restore.LOST  # until every worker has loaded
            self._get(refs)
            self._head = None
            self._take_snapshot(checkpoint=ckpt.path)

        self._not_retried(call)
        return ckpt.manifest

    def stats(self) -> list[dict]:
        """Per worker: call counts, parameter counts and branch ids (read from the workers)."""
        return self._idempotent(lambda workers: self._get([w.stats.remote() for w in workers]))

    def info(self) -> dict:
        stats = self.stats()
        return {"num_branches": self.cfg.model.num_branches, "workers": len(self.workers),
                "transport": self.cfg.parallel.transport, "layout": str(self.layout),
                "nodes": self.worker_nodes(), "step": stats[0]["step"],
                "recoveries": len(self.recoveries),
                "params": sum(s["branches"] for s in stats) + stats[0]["replicated"]}

    def worker_nodes(self) -> list[str]:
        return [p["node_id"] for p in self.placement]

    def worker_pids(self) -> list[int]:
        """Process id of every worker, by rank (tests kill them with it; launch/chaos.py reads
        engine.placement itself)."""
        return [int(p["pid"]) for p in self.placement]
