"""The engine the driver uses: W branch workers on Ray, one broadcast, one reduce.

    with Engine(cfg, checkpoint="runs/x") as engine:
        logits = engine.infer(x)                 # x (B, C, H, W) float32
        engine.save("runs/y/checkpoints/step_0000001", epoch=1)

Inference: the driver hands every worker the same one copy of the batch and sends every request
before awaiting any reply (runtime/transport.py: a shared-memory slot and the socket fast path when
every worker shares its node, else the object store and one Ray call per worker). With the
`collective` transport rank 0 gathers every worker's pooled branch rows (K_w, B, D) inside the
worker group, adds all of them in branch order (ordered_sum: the single-process model's additions)
and applies the head; with `object_store` each worker returns its rows (K_w, B, D) and the driver
concatenates them into (K, B, D) and adds them in the same branch order before its head.

The engine is three parts and the calls that use them: the WorkerGroup (runtime/group.py: actors,
placement, process group, replacing a rank), the Transport (runtime/transport.py: batches, the fast
path and every default-thread submission) and Faults (runtime/faults.py: the one retry loop, the
recovery, the restore state).

Faults (docs/FAILURES.md): a worker that dies or does not answer within parallel.timeout_s is noticed
by the call that needed it; a background recovery (runtime/faults.py) restarts it in its bundle,
restores its weights from the engine's object-store snapshot and re-forms the group, and idempotent
calls (infer, prefix_logits, state reads) are retried. serve.degraded=wait blocks calls until then;
serve.degraded=allow answers infer_with_meta from the surviving branches meanwhile, marked degraded.
The engine does not train: training runs the one training loop (train/rank_loop.py) under Ray Train,
which owns and restarts its own worker group (train/raytrain.py); an engine's weights come from its
seed or a checkpoint (load), and train.precision's autocast applies to its workers' forward.
"""

from __future__ import annotations

import time

import ray
import torch

from layerpar.config import Config
from layerpar.model.overflow import check_finite_logits
from layerpar.model.paraformer import ordered_sum, prefix_sums
from layerpar.parallel.cluster import ClusterError, connect
from layerpar.runtime.degraded import HeadCopy, degraded_answer
from layerpar.runtime.errors import Recovering, WorkerError
from layerpar.runtime.faults import Faults
from layerpar.runtime.group import WorkerGroup
from layerpar.runtime.inputs import check_input, prefix_size
from layerpar.runtime.recovery import Restore
from layerpar.runtime.transport import merge_timings
from layerpar.runtime.worker import as_tensor

__all__ = ["ClusterError", "Engine", "WorkerError", "connect"]


def _not_waiting(rec) -> None:
    raise Recovering(f"the engine is recovering ({rec.reason}); not waiting for it")


class Engine:
    def __init__(self, cfg: Config, *, total_steps: int = 0, checkpoint: str | None = None,
                 node_id: str | None = None):
        """node_id: place every worker on that node (a replica set spreading its groups)."""
        if cfg.parallel.workers < 1:
            raise ValueError("Engine needs parallel.workers >= 1; use LocalBackend for a single process")
        if cfg.model.kind != "paraformer":
            raise ValueError(f"Engine runs Para-Formers; model.kind is {cfg.model.kind!r}")
        self.cfg = cfg
        self.allow_degraded = cfg.serve.degraded == "allow"
        self.last_timings: dict[str, float] = {}
        self.last_bytes: dict[str, int] = {}
        self._owns_ray = connect(cfg)
        self.group = None
        try:
            self.group = WorkerGroup(cfg, total_steps=total_steps, node_id=node_id)
            self.layout, self.transport = self.group.layout, self.group.transport
            self.faults, self.head = Faults(self.group), HeadCopy(cfg)
            self.group.start()
            if checkpoint is not None:
                self.load(checkpoint)
        except BaseException:
            self.shutdown()
            raise

    # ------------------------------------------------------------------ lifecycle

    def shutdown(self) -> None:
        if self.group is not None:
            self.faults.close()
            self.group.shutdown()
        if self._owns_ray and ray.is_initialized():
            ray.shutdown()
        self._owns_ray = False

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()

    @property
    def recoveries(self) -> list[dict]:
        """One record per finished recovery (reason, seconds, phases, restarted ranks, ...)."""
        return self.faults.records

    def health(self) -> dict:
        return {**self.faults.health(), "placement_fallbacks": self.group.placement_fallbacks}

    # ------------------------------------------------------------------ inference

    def infer(self, x: torch.Tensor, num_branches: int | None = None) -> torch.Tensor:
        """Logits (B, classes) of the prefix model with `num_branches` branches (default all).
        Only the workers that own one of those branches are called. A lost worker is recovered and
        the call retried (serve.degraded=allow: see infer_with_meta). Raises InputOverflow (a
        ValueError) when a row's values overflow the model; infer_with_meta returns the logits as
        computed, for callers that refuse per row (the server, per merged request)."""
        return check_finite_logits(self.infer_with_meta(x, num_branches)[0])

    def infer_with_meta(self, x: torch.Tensor, num_branches: int | None = None, *, wait: bool = True
                        ) -> tuple[torch.Tensor, dict]:
        """(logits, {"degraded": bool, "branches_used": [...], "timings": {phase: seconds}}), the
        timings this call's own. While a lost worker is being recovered, serve.degraded=wait waits
        for it; serve.degraded=allow answers at once from the surviving workers' branches (head of
        their sum, in branch order), marked degraded. wait=False (a replica set's call): raise
        Recovering instead of waiting or degrading, also when a recovery starts (or a failure seen
        earlier awaits one) just as the call is dispatched."""
        x, k = check_input(self.cfg.model, x), prefix_size(self.cfg.model, num_branches)
        t0 = time.perf_counter()
        # one copy for every worker, and for every retry
        with self.transport.broadcast(x.numpy(), self.group.placement) as ref:
            broadcast_s = time.perf_counter() - t0

            def degraded(rec):
                out = degraded_answer(rec, self.head, self.group, ref, k)
                if out is not None:
                    self.last_timings = dict(out[1]["timings"])
                return out

            def call(workers):
                logits, timings = self._infer(workers, ref, x, k, broadcast_s)
                return logits, {"degraded": False, "branches_used": list(range(k)), "timings": timings}

            fallback = degraded if self.allow_degraded else None
            return self.faults.run(call, fallback=fallback if wait else _not_waiting, wait=wait)

    def _infer(self, workers: list, ref, x: torch.Tensor, k: int, broadcast_s: float
               ) -> tuple[torch.Tensor, dict[str, float]]:
        """(logits, this call's seconds per phase). The timings travel with the result: two callers
        sharing the engine (a replica set's slots) would read each other's from `last_timings`."""
        g = self.group
        t1 = time.perf_counter()
        t0 = t1 - broadcast_s
        r = self.layout.participants(k)
        row_bytes = x.shape[0] * self.cfg.model.dim * 4  # one pooled (B, D) row of one branch
        msg = ("infer", ref, k, g.collective)
        outs = self.transport.fast_call(workers, g.placement, r, msg,
                                        reply_bytes=self.layout.max_owned * row_bytes)
        if outs is None:  # not all on this node (or a huge reply): one Ray call per worker
            outs = g.call("infer", ref, k, g.collective, workers=workers[:r], timeout_s=g.call_timeout_s,
                          watch=True, field="parallel.call_timeout_s")
        t2 = time.perf_counter()
        if g.collective:
            logits, timings = as_tensor(outs[0][0]), merge_timings([o[1] for o in outs])
        else:
            rows = torch.cat([as_tensor(o[0]) for o in outs])  # (k, B, D) in branch order
            th = time.perf_counter()
            logits = self.head.get(g)(ordered_sum(rows))
            timings = {**merge_timings([o[1] for o in outs]),
                       "reduce": time.perf_counter() - t2, "head": time.perf_counter() - th}
        total_s = time.perf_counter() - t0
        worker_s = sum(timings.get(p, 0.0) for p in ("embed", "compute", "reduce", "head"))
        timings = {**timings, "broadcast": t1 - t0, "total": total_s,
                   "dispatch": max(0.0, total_s - (t1 - t0) - worker_s)}
        self.last_timings = timings  # the latest call's, for single-caller benchmarks
        self.last_bytes = {"broadcast": x.numel() * 4, "reduce": r * self.layout.max_owned * row_bytes,
                           "result": logits.numel() * 4}
        return logits, timings

    @property
    def available(self) -> bool:
        """No recovery runs: a call now goes straight to the workers."""
        return self.faults.available

    def prefix_work(self, k: int | None) -> int:
        """Branches the busiest worker runs for the prefix model of k branches (a cost unit)."""
        k = self.cfg.model.num_branches if k is None else k
        return max(len([b for b in self.layout.owned(r) if b < k]) for r in range(self.layout.num_workers))

    def head_module(self) -> torch.nn.Module:
        """The driver's copy of the (replicated, small) head, fetched from rank 0 when stale."""
        return self.head.get(self.group)

    @torch.no_grad()
    def prefix_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of every prefix model k = 1..N in one pass: (N, B, classes)."""
        with self.transport.broadcast(check_input(self.cfg.model, x).numpy(), self.group.placement) as ref:

            def call(workers):
                outs = self.group.call("branch_outputs", ref, workers=workers)
                rows = torch.cat([as_tensor(o) for o in outs])  # (N, B, D) in branch order
                return self.head.get(self.group)(prefix_sums(rows))

            return self.faults.run(call)

    def evaluate(self, split, batch_size: int = 256) -> dict:
        """Accuracy and loss of the full model and the accuracy of every prefix k = 1..N."""
        from layerpar.train.evaluate import evaluate

        return evaluate(self, split, batch_size)

    # ------------------------------------------------------------------ state

    def _collect(self, workers: list) -> tuple[dict, dict, int, list]:
        refs = self.transport.submit(workers, "pieces", True)
        outs = self.group.get(refs)
        pieces, optim = {}, {}
        for p, o, _ in outs:  # embed and head are replicated: every copy is the same
            pieces.update(p)
            optim.update(o)
        return pieces, optim, outs[0][2], refs

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The whole model's weights, gathered from the workers (the driver holds none between calls)."""
        pieces, _, _, _ = self.faults.run(self._collect)
        return {k: v for piece in pieces.values() for k, v in piece.items()}

    def save(self, path, *, epoch: int, extra: dict | None = None):
        from layerpar.train.checkpoint import save_checkpoint

        pieces, optim, step, refs = self.faults.run(self._collect)
        saved = save_checkpoint(path, pieces, config=self.cfg, step=step, epoch=epoch, optim=optim,
                                extra=extra)
        if self.faults.state is not Restore.FRESH:
            self.faults.take_snapshot(refs, checkpoint=saved)  # the refs stay in the object store
        return saved

    def load(self, path, *, weights_only: bool = False) -> dict:
        """Load a checkpoint written with any number of workers (or by a single process).
        weights_only (serving): the optimizer state is not read at all."""
        from layerpar.train.checkpoint import load_checkpoint

        ckpt = load_checkpoint(path, with_optim=not weights_only)
        step = int(ckpt.manifest.get("step", 0))
        args = []
        for rank in range(self.layout.num_workers):
            wanted = ["embed", "head"] + [f"branch.{b}" for b in self.layout.owned(rank)]
            missing = [p for p in wanted if p not in ckpt.tensors]
            if missing:
                raise ValueError(f"checkpoint {path} lacks {', '.join(missing)} "
                                 f"(it holds {len(ckpt.tensors)} pieces)")
            optim = {p: ckpt.optim[p] for p in wanted if p in (ckpt.optim or {})}
            args.append(({p: ckpt.tensors[p] for p in wanted}, optim or None, step))

        def call(workers):
            self.faults.lost()  # until every worker has loaded
            self.group.call("load", workers=workers, per_worker=args)
            self.head.invalidate()
            self.faults.take_snapshot(checkpoint=ckpt.path)

        self.faults.run(call, retry=False)
        return ckpt.manifest

    def stats(self) -> list[dict]:
        """Per worker: call counts, parameter counts and branch ids (read from the workers)."""
        return self.faults.run(lambda workers: self.group.call("stats", workers=workers))

    def info(self) -> dict:
        stats = self.stats()
        return {"num_branches": self.cfg.model.num_branches, "workers": self.layout.num_workers,
                "transport": self.cfg.parallel.transport, "layout": str(self.layout),
                "nodes": self.worker_nodes(), "step": stats[0]["step"],
                "recoveries": len(self.recoveries),
                "params": sum(s["branches"] for s in stats) + stats[0]["replicated"]}

    def worker_nodes(self) -> list[str]:
        return self.group.nodes()

    def worker_pids(self) -> list[int]:
        """Process id of every worker, by rank (tests kill them with it; layerpar/runtime/chaos.py reads
        engine.group.placement itself)."""
        return self.group.pids()
