"""The training loop every rank of a Ray Train worker group runs (SPMD): nothing is fed by a driver.

    TorchTrainer(train_loop_per_worker, train_loop_config={"cfg": cfg.to_dict(), ...})

Each rank builds its BranchShard (its branches plus replicas of the embedding and head), reads the
dataset itself and draws the same seeded batches and augmentation as every other rank and as the
single-process loop (layerpar.train.loop), so nothing is broadcast: only the pooled (K_w, B, D) branch
rows (one all_gather) and the replicated gradients with the squared branch norms (one sum over ranks:
an all_gather on gloo, an all_reduce on NCCL) cross the process group per optimizer step
(layerpar.parallel.comm). Each CPU rank runs on its own cores (parallel.pin_cpus). Every prefix model
is evaluated inside the loop; checkpoints are written by every rank (shard_checkpoint.py) and reported with
ray.train.report, and after a lost worker Ray Train restarts the group, which resumes exactly where
the newest complete checkpoint of this attempt on storage left off (the driver's start checkpoint if
there is none yet): not from ray.train.get_checkpoint(), which is Ray Train's last *registered*
checkpoint, possibly older, or one of an earlier attempt of the same run name.

What is reported: every checkpoint and the final result; an epoch without a checkpoint only when a
listener asked for it (config["report_epochs"]: Tune's TuneReportCallback). The driver needs none of
them -- metrics.jsonl and the progress bar come from the ProgressLog actor -- and each costs up to
RAY_TRAIN_HEALTH_CHECK_INTERVAL_S (2 s): Ray Train v2's controller takes one report per rank per poll
and a rank's result queue holds one, so a rank reporting more often than it polls waits for it.
"""

from __future__ import annotations

import os
import signal
import time
import uuid

import pyarrow.fs as pafs
import ray.train
import torch

from layerpar.config import from_dict
from layerpar.data import batches, batches_per_epoch, load_dataset
from layerpar.data.augment import augment
from layerpar.model.paraformer import prefix_sums
from layerpar.parallel.affinity import pin_rank
from layerpar.train.checkpoint import CheckpointError, load_checkpoint, step_dir_name
from layerpar.train.evaluate import epoch_record, evaluate
from layerpar.train.shard import BranchShard, TimedComm
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
from layerpar.train.step import prefix_plan

PROGRESS_EVERY_S = 0.5  # rank 0 tells the driver how far it is at most this often
DEADLINE_EVERY = 8  # batches between the ranks' agreement on train.max_minutes (a collective each)


class ShardEval:
    """The Backend protocol evaluate() needs, run by every rank together: all N branch rows are
    gathered in branch order and every rank applies the head to their running sums, exactly as
    local.prefix_logits_of does in one process."""

    def __init__(self, shard: BranchShard, comm) -> None:
        self.shard, self.comm = shard, comm

    @torch.no_grad()
    def prefix_logits(self, x: torch.Tensor) -> torch.Tensor:
        model = self.shard.model
        model.eval()
        x0 = model.embed(self.shard.on_device(x))
        rows = self.comm.all_branch_rows(model.branch_outputs(x0, model.branch_ids))  # (N, B, D)
        return model.head(prefix_sums(rows)).cpu()


def _restart_point(fs, root: str, config: dict) -> str | None:
    """Where this group starts (rank 0 decides, every rank of the mesh takes its answer): the newest
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
    with ray.train.Checkpoint(path=path, filesystem=fs).as_directory() as local:  # downloaded first
        return load_checkpoint(local, pieces=pieces)


def _restore(shard: BranchShard, comm, fs, root: str, config: dict) -> tuple[dict | None, str | None]:
    """Load this group's start point (_restart_point); returns its manifest and its path on `fs`."""
    where = _restart_point(fs, root, config) if comm.rank == 0 and comm.replica == 0 else None
    where = comm.share_objects(where, mesh=True)[0]  # rank 0's choice, on every rank of the mesh
    if where is None:
        return None, None
    ckpt = _load(fs, where, list(shard.pieces(replicated=True).keys()))
    shard.load(ckpt.tensors, ckpt.optim, ckpt.step)
    return ckpt.manifest, where


def _chaos(config: dict, rank: int, epoch: int, restored: bool, progress, point: str = "reported") -> None:
    """Fault injection for the tests (LAYERPAR_CHAOS_KILL="epoch=E,rank=R[,when=saved]" on the
    driver): rank R SIGKILLs itself once epoch E's checkpoint is reported (when=saved: once it is
    written, before Ray Train registers it), in a group that did not restore one."""
    spec = config.get("chaos")
    if not spec or "rank" not in spec or restored or spec["rank"] != rank or spec["epoch"] != epoch \
            or spec.get("when", "reported") != point:
        return
    if point == "reported":
        # wait until Ray Train has registered the checkpoint just reported: a rank that dies before
        # the controller collects every rank's report loses that checkpoint from Ray Train's list,
        # and "killed after checkpoint E was reported" would not be what happened
        ray.train.get_all_reported_checkpoints(timeout_s=120)
    if progress is not None:
        ray.get(progress.push.remote({"kind": "killed", "rank": rank, "pid": os.getpid(), "epoch": epoch}))
    os.kill(os.getpid(), signal.SIGKILL)


class _Clock:
    """Per-rank step-time phases: data (batch and augmentation), collectives, compute (the rest); and
    the training time outside the steps, in seconds: per-epoch validation, checkpoints, reports."""

    def __init__(self, comm: TimedComm) -> None:
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


def _train_epoch(shard, split, cfg, *, epoch: int, skip: int, clock: _Clock, progress, state: dict,
                 deadline: float | None) -> tuple[list[float], float, int]:
    """One pass from batch `skip` on; every rank draws the same batches. Returns (losses, lr, done)."""
    losses, lr, done = [], 0.0, skip
    t_data = time.perf_counter()
    for i, (x, y) in enumerate(batches(split, cfg.train.batch_size, seed=cfg.data.seed, epoch=epoch,
                                       skip=skip), start=skip):
        x = augment(x, kind=cfg.data.augment, seed=cfg.data.seed, epoch=epoch, index=i)
        t0, c0 = time.perf_counter(), clock.comm.seconds
        clock.data += t0 - t_data
        out = shard.train_step(x, y)
        t_data = time.perf_counter()
        clock.step += t_data - t0
        clock.coll += clock.comm.seconds - c0  # the step's collectives only (not evaluation's)
        clock.steps += 1
        losses.append(out["loss"])
        lr, done = out["lr"], i + 1
        state["step"], state["samples"] = out["step"], state["samples"] + len(y)
        if progress is not None and t_data - state["pushed"] > PROGRESS_EVERY_S:
            state["pushed"] = t_data
            progress.push.remote({"kind": "step", "epoch": epoch, "batch": done, "step": out["step"],
                                  "loss": out["loss"], "samples": state["samples"], "t": time.time()})
        if deadline is not None and done % DEADLINE_EVERY == 0 \
                and clock.comm.any_true(time.perf_counter() > deadline):
            break  # every rank stops at the same batch (rank clocks disagree)
    return losses, lr, done


def set_up_rank(cfg) -> list[int]:
    """Threads and device of this rank: its GPU, or on a CPU node its own cores (parallel.pin_cpus);
    returns the cores it was pinned to ([] if none)."""
    torch.set_num_threads(cfg.parallel.threads_per_worker)
    if cfg.parallel.gpus_per_worker > 0:
        torch.cuda.set_device(ray.train.torch.get_device())  # the GPU Ray Train gave this rank
        return []
    if not cfg.parallel.pin_cpus:
        return []
    ctx = ray.train.get_context()
    return pin_rank(local_rank=ctx.get_local_rank(), local_world=ctx.get_local_world_size(),
                    threads=cfg.parallel.threads_per_worker)


def _start(cfg, config: dict, rank: int, fs, root: str):
    """Threads, device, cores, dataset, this rank's shard and its comm, restored state."""
    set_up_rank(cfg)
    torch.manual_seed(cfg.train.seed)
    splits = load_dataset(cfg)
    bpe = batches_per_epoch(len(splits.train), cfg.train.batch_size)
    shard, comm = BranchShard.attached(cfg, global_rank=rank,
                                       total_steps=cfg.train.epochs * bpe * len(prefix_plan(cfg)))
    manifest, where = _restore(shard, comm, fs, root, config)
    return splits, bpe, shard, comm, manifest, where


def train_loop_per_worker(config: dict) -> None:
    """Ray Train's per-worker function. config: cfg (Config dict), start (the start checkpoint's
    path on the storage filesystem, verified by the driver, or None), root (the run's directory on
    that filesystem), attempt (this driver attempt's id, stamped on its checkpoints), progress (the
    driver's ProgressLog actor or None), report_epochs (also report the epochs without a
    checkpoint), chaos (tests only)."""
    run = _Run(config)
    t, clock = run.cfg.train, run.clock
    for epoch in range(run.start_epoch, t.epochs):
        record, stopped, over = run.epoch(epoch)
        finished = epoch + 1 == t.epochs
        checkpoint, t0 = None, time.perf_counter()
        save = stopped or finished or over or (epoch + 1) % t.checkpoint_every == 0
        run.history.append(record)
        if save:
            checkpoint = run.save(record)  # the ray.train.Checkpoint on rank 0, None elsewhere
            t0 = clock.add("checkpoint_s", t0)
        _chaos(config, run.rank, record["epoch"], run.where is not None, run.progress, "saved")
        if run.progress is not None and run.rank == 0:
            run.progress.push.remote({"kind": "epoch", "record": record})
        if save or config.get("report_epochs"):  # the same on every rank: they report together
            ray.train.report({"kind": "epoch", **record}, checkpoint=checkpoint,
                             checkpoint_dir_name=step_dir_name(run.shard.step),
                             checkpoint_upload_fn=lambda ck, _name: ck)  # written in place already
            clock.add("report_s", t0)
        _chaos(config, run.rank, record["epoch"], run.where is not None, run.progress)
        if stopped or over:
            run.stopped_early = stopped or not finished
            break
    run.finish()


class _Run:
    """One rank's run: its shard, comm, clocks and where it stands."""

    def __init__(self, config: dict) -> None:
        self.cfg, self.t0 = from_dict(config["cfg"]), time.perf_counter()
        ctx = ray.train.get_context()
        self.rank, storage = ctx.get_world_rank(), ctx.get_storage()
        # the run's directory on storage (the driver's STORAGE/<run name>); Ray Train's own directory
        # for this attempt is elsewhere (raytrain.fit)
        self.fs, self.root = storage.storage_filesystem, config.get("root") or storage.experiment_fs_path
        self.config, self.progress = config, config.get("progress")
        self.splits, self.bpe, self.shard, self.comm, manifest, self.where = _start(
            self.cfg, config, self.rank, self.fs, self.root)
        self.extra = (manifest or {}).get("extra", {})
        # every epoch record of this history, carried by each checkpoint (metrics.jsonl is rebuilt
        # from the start checkpoint's, so a record in flight when the driver died is not lost)
        self.history = [r for r in self.extra.get("metrics", []) if r["epoch"] <= int(manifest["epoch"])] \
            if manifest else []
        self.start_epoch = int((manifest or {}).get("epoch", 0))
        self.skip = int(self.extra.get("epoch_batches", 0))
        self.prior = float(self.extra.get("train_seconds", 0.0))
        if self.progress is not None:
            self.progress.push.remote({"kind": "start", "rank": self.rank, "pid": os.getpid(),
                                       "restored": self.where, "epoch": self.start_epoch,
                                       "batch": self.skip, "step": self.shard.step,
                                       "node": ray.get_runtime_context().get_node_id()})
        if self.rank == 0:
            clean_staging(self.fs, self.root)
        self.evaluator, self.clock = ShardEval(self.shard, self.comm), _Clock(self.comm)
        self.state = {"step": self.shard.step, "samples": 0, "pushed": 0.0}
        self.t_train, self.eval_bs = time.perf_counter(), max(self.cfg.train.batch_size, 256)
        self.val, self.stopped_early = None, False
        self.ckpt_epoch, self.ckpt_path = (self.start_epoch if manifest else 0), self.where

    def epoch(self, epoch: int) -> tuple[dict, bool, bool]:
        """Train one epoch (from self.skip), validate; (record, stopped early, over budget)."""
        t_epoch, budget_s = time.perf_counter(), self.cfg.train.max_minutes * 60.0
        losses, lr, done = _train_epoch(self.shard, self.splits.train, self.cfg, epoch=epoch, skip=self.skip,
                                        clock=self.clock, progress=self.progress, state=self.state,
                                        deadline=self.t_train + budget_s if budget_s else None)
        stopped, self.skip = done < self.bpe, 0
        t_eval = time.perf_counter()
        self.val = val = evaluate(self.evaluator, self.splits.val, self.eval_bs)
        self.clock.add("eval_s", t_eval)
        elapsed = time.perf_counter() - self.t_train
        record = epoch_record(epoch=epoch, step=self.shard.step, losses=losses, val=val, lr=lr,
                              seconds=time.perf_counter() - t_epoch, done=done, stopped=stopped,
                              train_seconds=self.prior + elapsed)
        # agreed: rank clocks disagree, and every rank must take the same save and report decision
        return record, stopped, bool(budget_s) and self.comm.any_true(elapsed > budget_s)

    def save(self, record: dict):
        """Every rank of replica 0 writes its pieces (the other replicas hold the same weights);
        rank 0 gets the ray.train.Checkpoint to report."""
        now = time.perf_counter()
        extra = {"train_seconds": self.prior + now - self.t_train,
                 "total_seconds": float(self.extra.get("total_seconds", self.prior)) + now - self.t0}
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
        return ray.train.Checkpoint(path=self.ckpt_path, filesystem=self.fs)

    def finish(self) -> None:
        """Test every prefix, gather every rank's step-time split, and report the end."""
        train_seconds = self.prior + time.perf_counter() - self.t_train
        test = evaluate(self.evaluator, self.splits.test, self.eval_bs)
        if self.val is None:  # nothing left to train (resumed a finished run)
            self.val = evaluate(self.evaluator, self.splits.val, self.eval_bs)
        phases = self.comm.share_objects(self.clock.phases(), mesh=True)  # every rank's, in rank order
        final = {"kind": "final", "test_accuracy": test["accuracy"], "test_loss": test["loss"],
                 "val_accuracy": self.val["accuracy"], "prefix_accuracy": test["prefix_accuracy"],
                 "train_seconds": round(train_seconds, 3), "epochs": self.ckpt_epoch,
                 "steps": self.shard.step, "stopped_early": self.stopped_early,
                 "checkpoint": self.ckpt_path, "phases": phases, "params": _params(self.shard, self.comm)}
        if self.progress is not None and self.rank == 0:  # Result.metrics: the last checkpoint's only
            ray.get(self.progress.push.remote({"kind": "final", "record": final}))
        ray.train.report(final)  # Tune (and the dashboard) see it too


def _params(shard: BranchShard, comm) -> int:
    counts = comm.share_objects(shard.param_counts())
    return sum(c["branches"] for c in counts) + counts[0]["replicated"]
