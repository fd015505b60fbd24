"""The training loop, written once. Every rank of a Ray Train worker group runs it (spmd.py), and so
does one process (loop.py: a world of one -- a BranchShard holding every branch, LocalComm, no Ray,
no process group). This is the one place that decides where a rank starts (restart_point), when the
time budget stops training (deadline_due, over budget), when a checkpoint is saved (run_rank), what
an epoch record says, and how validation and test run.

    run = RankRun(cfg, config, host, shard=shard, comm=comm, splits=splits, fs=fs, root=root)
    final = run_rank(run)      # {"test_accuracy", ..., "checkpoint", "phases", "params"}

What differs between the two worlds is a Host: how events leave the rank (Ray Train reports and the
driver's ProgressLog actor; or a progress bar and metrics.jsonl in this process) and the tests'
fault injection. A host never decides anything.
"""

from __future__ import annotations

import tempfile
import time
import uuid
from typing import Protocol

import pyarrow.fs as pafs
import torch

from layerpar.model import ParaFormer
from layerpar.model.paraformer import prefix_sums
from layerpar.train.checkpoint import CheckpointError, load_checkpoint
from layerpar.train.evaluate import epoch_record, evaluate_feed
from layerpar.train.feed import MemoryFeed
from layerpar.train.shard_checkpoint import (
    checkpoint_path,
    clean_staging,
    open_storage,
    prune_stored,
    save_sharded,
    stored_checkpoints,
    stored_manifest,
    wait_published,
)

PROGRESS_EVERY_S = 0.5  # a rank tells its host how far it is at most this often
DEADLINE_EVERY = 8  # batches between the ranks' agreement on train.max_minutes (a collective each)


class Host(Protocol):
    """Where a rank's events go; see spmd.RayHost and loop.LocalHost."""

    def started(self, event: dict) -> None: ...
    def step(self, event: dict) -> None: ...
    def epoch(self, record: dict, path: str | None, saved: bool) -> None: ...
    def final(self, record: dict) -> None: ...


class ShardEval:
    """The Backend protocol evaluate() needs, run by every rank together: all N branch rows are
    gathered in branch order and every rank applies the head to their running sums, exactly as
    local.prefix_logits_of does in one process."""

    def __init__(self, shard, comm) -> None:
        self.shard, self.comm = shard, comm

    @torch.no_grad()
    def prefix_logits(self, x: torch.Tensor) -> torch.Tensor:
        model = self.shard.model
        model.eval()
        with self.shard.autocast():
            if not isinstance(model, ParaFormer):  # a ViT (one process only): one "prefix"
                return model(self.shard.on_device(x)).float().unsqueeze(0).cpu()
            x0 = model.embed(self.shard.on_device(x))
            rows = self.shard.branch_rows(x0, model.branch_ids)  # (K_w, B, D)
        rows = self.comm.all_branch_rows(rows.float() if rows.dtype in _HALF else rows)  # (N, B, D)
        with self.shard.autocast():
            return model.head(prefix_sums(rows)).float().cpu()


_HALF = (torch.bfloat16, torch.float16)


class Clock:
    """Per-rank step-time phases: data (batch and augmentation), collectives, compute (the rest); and
    the training time outside the steps, in seconds: per-epoch validation, checkpoints, reports."""

    def __init__(self, comm) -> None:  # a TimedComm: its `seconds` are the collectives' time
        self.comm, self.data, self.step, self.coll, self.steps = comm, 0.0, 0.0, 0.0, 0
        self.outside = {"eval_s": 0.0, "checkpoint_s": 0.0, "report_s": 0.0}

    def add(self, phase: str, since: float) -> float:
        """Add the time since `since` to an outside phase; returns now."""
        now = time.perf_counter()
        self.outside[phase] += now - since
        return now

    def phases(self) -> dict:
        n, coll = max(1, self.steps), self.coll
        return {"steps": self.steps, "data_ms": 1e3 * self.data / n, "collectives_ms": 1e3 * coll / n,
                "compute_ms": 1e3 * max(0.0, self.step - coll) / n, "step_ms": 1e3 * self.step / n,
                **{k: round(v, 3) for k, v in self.outside.items()}}


def deadline_due(done: int, comm) -> bool:
    """Whether the ranks look at the clock after `done` batches: every DEADLINE_EVERY batches when
    they must agree (a collective each: rank clocks disagree); every batch in a world of one, where
    agreeing costs nothing."""
    return comm.world_size * comm.replicas == 1 or done % DEADLINE_EVERY == 0


def train_epoch(shard, feed, cfg, *, epoch: int, skip: int, clock: Clock, host: Host, state: dict,
                deadline: float | None) -> tuple[list[float], float, int]:
    """One pass from batch `skip` on; the feed (train/feed.py) gives every rank its batches, fixed by
    (data.seed, epoch). Returns (losses, lr, done)."""
    losses, lr, done = [], 0.0, skip
    t_data = time.perf_counter()
    for i, (x, y, share) in enumerate(feed.train_batches(epoch, skip), start=skip):
        t0, c0 = time.perf_counter(), clock.comm.seconds
        clock.data += t0 - t_data  # a streamed feed's broadcast counts as data time
        out = shard.train_step(x, y, share=share)
        t_data = time.perf_counter()
        clock.step += t_data - t0
        clock.coll += clock.comm.seconds - c0  # the step's collectives only (not evaluation's)
        clock.steps += 1
        losses.append(out["loss"])
        lr, done = out["lr"], i + 1
        state["step"], state["samples"] = out["step"], state["samples"] + len(y)
        if t_data - state["pushed"] > PROGRESS_EVERY_S:
            state["pushed"] = t_data
            host.step({"kind": "step", "epoch": epoch, "batch": done, "step": out["step"],
                       "loss": out["loss"], "samples": state["samples"], "t": time.time()})
        if deadline is not None and deadline_due(done, clock.comm) \
                and clock.comm.any_true(time.perf_counter() > deadline):
            break  # every rank stops at the same batch
    return losses, lr, done


def restart_point(fs, root: str, config: dict) -> str | None:
    """Where a group starts (rank 0 decides, every rank of the mesh takes its answer): the newest
    complete checkpoint on storage that this attempt wrote (Ray Train restarted the group after a
    failure), else the attempt's start checkpoint (the one the driver announced), else None. Ray
    Train's own get_checkpoint() is not asked: it is the last *registered* checkpoint, which can be
    older than the newest complete one, or one of an earlier attempt of the same run."""
    for path in reversed(stored_checkpoints(fs, root)):
        try:
            if stored_manifest(fs, path).get("extra", {}).get("attempt") == config.get("attempt"):
                return path
        except CheckpointError:
            continue
    return config.get("start")


def _load(fs, path: str, pieces: list[str]):
    if "://" in path:  # the driver's start checkpoint, named by URI (it may be on another store)
        fs, path = open_storage(path)
    if isinstance(fs, pafs.LocalFileSystem):
        return load_checkpoint(path, pieces=pieces)
    with tempfile.TemporaryDirectory(prefix="layerpar-ckpt-") as local:  # object storage: a copy
        pafs.copy_files(path, local, source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
        return load_checkpoint(local, pieces=pieces)


def restore(shard, comm, fs, root: str, config: dict) -> tuple[dict | None, str | None]:
    """Load this group's start point (restart_point); returns its manifest and its path on `fs`."""
    where = restart_point(fs, root, config) if comm.rank == 0 and comm.replica == 0 else None
    where = comm.share_objects(where, mesh=True)[0]  # rank 0's choice, on every rank of the mesh
    if where is None:
        return None, None
    ckpt = _load(fs, where, list(shard.pieces(replicated=True).keys()))
    shard.load(ckpt.tensors, ckpt.optim, ckpt.step)
    return ckpt.manifest, where


class RankRun:
    """One rank's run: its shard, comm, clocks and where it stands. config: start (the start
    checkpoint, verified by the driver, or None), attempt (stamped on this attempt's checkpoints),
    prior_total (the wall time of the runs before, when the start checkpoint does not say), chaos
    (tests only: slow_publish_s). feed: where the batches come from (train/feed.py; default the
    in-memory `splits`)."""

    def __init__(self, cfg, config: dict, host: Host, *, shard, comm, splits, fs, root: str,
                 rank: int = 0, t0: float | None = None, feed=None) -> None:
        self.cfg, self.config, self.host, self.shard, self.comm = cfg, config, host, shard, comm
        self.t0 = time.perf_counter() if t0 is None else t0
        self.rank, self.splits, self.fs, self.root = rank, splits, fs, root
        self.feed = feed if feed is not None else MemoryFeed(cfg, splits)
        self.bpe = self.feed.batches_per_epoch()
        manifest, self.where = restore(shard, comm, fs, root, config)
        self.extra = (manifest or {}).get("extra", {})
        # every epoch record of this history, carried by each checkpoint (metrics.jsonl is rebuilt
        # from the start checkpoint's, so a record in flight when the driver died is not lost)
        self.history = [r for r in self.extra.get("metrics", []) if r["epoch"] <= int(manifest["epoch"])] \
            if manifest else []
        self.start_epoch = int((manifest or {}).get("epoch", 0))
        self.skip = int(self.extra.get("epoch_batches", 0))
        self.prior = float(self.extra.get("train_seconds", 0.0))
        self.prior_total = float(self.extra.get("total_seconds", self.prior))
        # train.max_minutes bounds one invocation: a group Ray Train restarted from a checkpoint of
        # this attempt has already spent part of it (a resume by a new driver starts a new budget)
        same_attempt = manifest and self.extra.get("attempt") == config.get("attempt")
        self.spent = float(self.extra.get("attempt_train_seconds", 0.0)) if same_attempt else 0.0
        if rank == 0:
            clean_staging(fs, root)
        host.started({"kind": "start", "rank": rank, "restored": self.where, "epoch": self.start_epoch,
                      "batch": self.skip, "step": shard.step})
        # a language model's shard brings its own evaluator (train/lm_shard.LMEval)
        self.evaluator = shard.evaluator(comm) if hasattr(shard, "evaluator") else ShardEval(shard, comm)
        self.clock = Clock(comm)
        self.state = {"step": shard.step, "samples": 0, "pushed": 0.0}
        self.t_train, self.eval_bs = time.perf_counter(), max(cfg.train.batch_size, 256)
        self.val, self.stopped_early = None, False
        self.ckpt_epoch, self.ckpt_path = (self.start_epoch if manifest else 0), self.where

    def epoch(self, epoch: int) -> tuple[dict, bool, bool]:
        """Train one epoch (from self.skip), validate; (record, stopped early, over budget)."""
        t_epoch, budget_s = time.perf_counter(), self.cfg.train.max_minutes * 60.0 - self.spent
        budget_s = max(budget_s, 1e-9) if self.cfg.train.max_minutes else 0.0
        losses, lr, done = train_epoch(self.shard, self.feed, self.cfg, epoch=epoch, skip=self.skip,
                                       clock=self.clock, host=self.host, state=self.state,
                                       deadline=self.t_train + budget_s if budget_s else None)
        stopped, self.skip = done < self.bpe, 0
        t_eval = time.perf_counter()
        self.val = val = self.evaluate("val")
        self.clock.add("eval_s", t_eval)
        elapsed = time.perf_counter() - self.t_train
        record = epoch_record(epoch=epoch, step=self.shard.step, losses=losses, val=val, lr=lr,
                              seconds=time.perf_counter() - t_epoch, done=done, stopped=stopped,
                              train_seconds=self.prior + elapsed)
        # agreed: rank clocks disagree, and every rank must take the same save and report decision
        return record, stopped, bool(budget_s) and self.comm.any_true(elapsed > budget_s)

    def evaluate(self, name: str) -> dict:
        """Every prefix model on val or test: the whole split on every replica, or (a streamed feed)
        each replica's share, the counts summed over replicas."""
        return evaluate_feed(self.evaluator, self.feed, name, self.eval_bs, self.comm)

    def save(self, record: dict) -> str | None:
        """Every rank of replica 0 writes its pieces (the other replicas hold the same weights);
        returns the published checkpoint's path on rank 0, None elsewhere."""
        now = time.perf_counter()
        extra = {"train_seconds": self.prior + now - self.t_train,
                 "attempt_train_seconds": self.spent + now - self.t_train,
                 "total_seconds": self.prior_total + now - self.t0}
        if "epoch_batches" in record:
            extra.update(epoch_batches=record["epoch_batches"], stopped_early=True)
        extra.update(attempt=self.config.get("attempt"), metrics=self.history)
        self.ckpt_epoch = record["epoch"]
        token = self.comm.share_objects(uuid.uuid4().hex[:8], mesh=True)[0]  # rank 0's, every rank
        if self.comm.replica == 0:
            slow = (self.config.get("chaos") or {}).get("slow_publish_s", 0.0)  # tests only
            self.ckpt_path = save_sharded(self.fs, self.root, self.shard, self.comm, cfg=self.cfg,
                                          step=self.shard.step, epoch=self.ckpt_epoch, extra=extra,
                                          token=token, publish_delay_s=slow)
        else:
            self.ckpt_path = checkpoint_path(self.root, self.shard.step)
        if self.rank != 0:  # rank 0 publishes; the others wait for it here, with the save's own bound
            wait_published(self.fs, self.ckpt_path, token, self.cfg.train.save_timeout_s)
            return None
        prune_stored(self.fs, self.root, self.cfg.train.keep_checkpoints)
        return self.ckpt_path

    def finish(self) -> dict:
        """Test every prefix, gather every rank's step-time split: the final record."""
        train_seconds = self.prior + time.perf_counter() - self.t_train
        test = self.evaluate("test")
        if self.val is None:  # nothing left to train (resumed a finished run)
            self.val = self.evaluate("val")
        phases = self.comm.share_objects(self.clock.phases(), mesh=True)  # every rank's, in rank order
        counts = self.comm.share_objects(self.shard.param_counts())
        return {"kind": "final", **{f"test_{k}": v for k, v in test.get("extra", {}).items()},
                **{f"val_{k}": v for k, v in self.val.get("extra", {}).items()},
                "test_accuracy": test["accuracy"], "test_loss": test["loss"],
                "val_accuracy": self.val["accuracy"], "prefix_accuracy": test["prefix_accuracy"],
                "train_seconds": round(train_seconds, 3), "epochs": self.ckpt_epoch,
                "steps": self.shard.step, "stopped_early": self.stopped_early,
                "checkpoint": self.ckpt_path, "phases": phases,
                "params": sum(c["branches"] for c in counts) + counts[0]["replicated"]}


def run_rank(run: RankRun) -> dict:
    """The epochs from the start point: train, validate, record, and save when the run is done,
    stopped by the time budget, or every train.checkpoint_every epochs. Returns the final record."""
    t, clock = run.cfg.train, run.clock
    for epoch in range(run.start_epoch, t.epochs):
        record, stopped, over = run.epoch(epoch)
        finished = epoch + 1 == t.epochs
        path, t0 = None, time.perf_counter()
        save = stopped or finished or over or (epoch + 1) % t.checkpoint_every == 0
        run.history.append(record)
        if save:
            path = run.save(record)
            t0 = clock.add("checkpoint_s", t0)
        run.host.epoch(record, path, save)  # the same on every rank: Ray Train's ranks report together
        clock.add("report_s", t0)
        if stopped or over:
            run.stopped_early = stopped or not finished
            break
    final = run.finish()
    run.host.final(final)
    return final
