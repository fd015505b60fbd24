"""Ray Train's side of the training loop every rank runs (SPMD): nothing is fed by a driver. The loop
itself -- start point, time budget, saving, evaluation, the epoch record -- is rank_loop.run_rank,
the same one a single process runs; this file sets the rank up and is its Host (reports, progress).

    TorchTrainer(train_loop_per_worker, train_loop_config={"cfg": cfg.to_dict(), ...})

Each rank builds its BranchShard (its branches plus replicas of the embedding and head), reads the
dataset itself and draws the same seeded batches and augmentation as every other rank and as the
single-process loop (layerpar.train.loop), so nothing is broadcast: only the pooled (K_w, B, D) branch
rows (one all_gather) and the replicated gradients with the squared branch norms (one sum over ranks:
an all_gather on gloo, an all_reduce on NCCL) cross the process group per optimizer step
(layerpar.parallel.comm). With data.streaming no rank loads the dataset: each replica group's leader
reads its share of every batch with Ray Data and broadcasts it to the group (train/feed.StreamingFeed,
from the driver's check: the catalog in the object store, the split sizes, the normalisation
constants). Each CPU rank runs on its own cores (parallel.pin_cpus). Every prefix model
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

import ray.train
import torch

from layerpar.config import from_dict
from layerpar.data import batches_per_epoch, load_dataset
from layerpar.parallel.affinity import pin_rank
from layerpar.train.checkpoint import step_dir_name
from layerpar.train.feed import MemoryFeed, StreamingFeed
from layerpar.train.lm_shard import shard_class
from layerpar.train.rank_loop import RankRun, run_rank
from layerpar.train.step import prefix_plan


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


class RayHost:
    """Where a rank's events go under Ray Train: rank 0 pushes progress to the driver's ProgressLog
    actor; every rank reports each checkpoint (and, for a listener, each epoch) with
    ray.train.report; the tests' chaos kills a rank at a named point."""

    def __init__(self, config: dict, rank: int, fs) -> None:
        self.config, self.rank, self.fs = config, rank, fs
        self.progress, self.restored = config.get("progress"), False

    def _push(self, event: dict, *, wait: bool = False) -> None:
        if self.progress is not None and self.rank == 0:
            ref = self.progress.push.remote(event)
            if wait:
                ray.get(ref)

    def started(self, event: dict) -> None:
        self.restored = event["restored"] is not None
        if self.progress is not None:  # every rank: the driver learns each rank's node and pid
            self.progress.push.remote({**event, "pid": os.getpid(),
                                       "node": ray.get_runtime_context().get_node_id()})

    def step(self, event: dict) -> None:
        self._push(event)

    def epoch(self, record: dict, path: str | None, saved: bool) -> None:
        _chaos(self.config, self.rank, record["epoch"], self.restored, self.progress, "saved")
        self._push({"kind": "epoch", "record": record})
        if saved or self.config.get("report_epochs"):  # the same on every rank: they report together
            checkpoint = None if path is None else ray.train.Checkpoint(path=path, filesystem=self.fs)
            step = record["step"]
            ray.train.report({"kind": "epoch", **record}, checkpoint=checkpoint,
                             checkpoint_dir_name=step_dir_name(step),
                             checkpoint_upload_fn=lambda ck, _name: ck)  # written in place already
        _chaos(self.config, self.rank, record["epoch"], self.restored, self.progress)

    def final(self, record: dict) -> None:
        # waited for: Result.metrics holds the last checkpoint's metrics only
        self._push({"kind": "final", "record": record}, wait=True)
        ray.train.report(record)  # Tune (and the dashboard) see it too


def train_loop_per_worker(config: dict) -> None:
    """Ray Train's per-worker function. config: cfg (Config dict), start (the start checkpoint's
    path on the storage filesystem, verified by the driver, or None), root (the run's directory on
    that filesystem), attempt (this driver attempt's id, stamped on its checkpoints), progress (the
    driver's ProgressLog actor or None), report_epochs (also report the epochs without a
    checkpoint), chaos (tests only)."""
    cfg, t0 = from_dict(config["cfg"]), time.perf_counter()
    ctx = ray.train.get_context()
    rank, storage = ctx.get_world_rank(), ctx.get_storage()
    # the run's directory on storage (the driver's STORAGE/<run name>); Ray Train's own directory
    # for this attempt is elsewhere (raytrain.fit)
    fs, root = storage.storage_filesystem, config.get("root") or storage.experiment_fs_path
    set_up_rank(cfg)
    torch.manual_seed(cfg.train.seed)
    stream = config.get("stream")  # data.streaming: what the driver's check found, not the data
    splits = load_dataset(cfg) if stream is None else None
    bpe = batches_per_epoch(stream["rows"]["train"] if stream else len(splits.train), cfg.train.batch_size)
    shard, comm = shard_class(cfg).attached(cfg, global_rank=rank,
                                       total_steps=cfg.train.epochs * bpe * len(prefix_plan(cfg)))
    host, feed = RayHost(config, rank, fs), None
    if stream is not None:  # only a branch group's leader (branch rank 0) reads: it needs the catalog
        catalog = ray.get(stream["catalog"]) if comm.rank == 0 else None
        feed = StreamingFeed(cfg, comm, rows=stream["rows"], catalog=catalog, stats=stream["stats"])
    if (config.get("chaos") or {}).get("when") == "batch":
        feed = _ChaosFeed(feed or MemoryFeed(cfg, splits), config, rank, host)
    run = RankRun(cfg, config, host, shard=shard, comm=comm, splits=splits,
                  fs=fs, root=root, rank=rank, t0=t0, feed=feed)
    run_rank(run)


class _ChaosFeed:
    """Tests only (LAYERPAR_CHAOS_KILL="epoch=E,rank=R,batch=K"): rank R SIGKILLs itself as it is
    handed batch K of epoch E, mid-epoch, in a group that did not restore a checkpoint."""

    def __init__(self, feed, config: dict, rank: int, host: RayHost) -> None:
        self.feed, self.spec, self.rank, self.host = feed, config["chaos"], rank, host

    def __getattr__(self, name):
        return getattr(self.feed, name)

    def train_batches(self, epoch: int, skip: int = 0):
        for k, batch in enumerate(self.feed.train_batches(epoch, skip), start=skip):
            if (epoch, k, self.rank) == (self.spec["epoch"], self.spec["batch"], self.spec["rank"]) \
                    and not self.host.restored:
                if self.host.progress is not None:
                    ray.get(self.host.progress.push.remote({"kind": "killed", "rank": self.rank,
                                                            "pid": os.getpid(), "epoch": epoch, "batch": k}))
                os.kill(os.getpid(), signal.SIGKILL)
            yield batch
