"""The training loop: data -> backend -> epochs (train, validate, checkpoint) -> test.

    result = run_training(load_config("digits"))            # a new run dir under train.out_dir
    result = run_training(cfg, run_dir="runs/my-run")        # resumes if the dir holds a checkpoint

This is the driver: it checks the data, finds and verifies the start checkpoint (start_point), then
runs the one training loop (rank_loop.run_rank) -- on every rank under Ray Train (parallel.workers >= 1,
raytrain.fit), or here in this process as a world of one (parallel.workers = 0: a BranchShard holding
every branch, LocalComm, no Ray, no process group). It is deterministic given the seeds: weights from
train.seed, batch order from data.seed and the epoch, so a run resumed from a checkpoint -- even one
taken mid-epoch by the time budget -- continues exactly as the uninterrupted run would.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs
import torch
from tqdm import tqdm

from layerpar.config import ConfigError, load_config, save_config
from layerpar.data import DataError, batches_per_epoch, load_dataset
from layerpar.train.checkpoint import (
    CHECKPOINTS,
    MANIFEST,
    CheckpointError,
    _restore_replaced,
)
from layerpar.train.feed import StreamingFeed, check_stream
from layerpar.train.lm_shard import shard_class
from layerpar.train.metrics_log import add_metric, rebuild_metrics
from layerpar.train.rank_loop import RankRun, run_rank
from layerpar.train.shard import BranchShard, TimedComm
from layerpar.train.shard_checkpoint import (
    find_checkpoint,
    open_storage,
    resolve_storage,
    storage_uri,
    stored_checkpoints,
    supersede,
    verify_stored,
)
from layerpar.train.step import prefix_plan


def run_name(cfg) -> str:
    """Default run directory name: 20250101-120000-digits-paraformer[-progressive]."""
    mode = "-progressive" if cfg.train.mode == "progressive" and cfg.model.kind == "paraformer" else ""
    return f"{time.strftime('%Y%m%d-%H%M%S')}-{cfg.data.name}-{cfg.model.kind}{mode}"


def new_run_path(cfg) -> Path:
    """A timestamped run directory under train.out_dir that does not exist yet."""
    base = Path(cfg.train.out_dir) / run_name(cfg)
    path, n = base, 1
    while path.exists():  # two runs started in the same second
        n += 1
        path = base.with_name(f"{base.name}-{n}")
    return path


def make_run_dir(cfg, run_dir: str | Path | None) -> Path:
    """The given run dir (created if needed), or a new timestamped one under train.out_dir."""
    path = Path(run_dir) if run_dir is not None else new_run_path(cfg)
    path.mkdir(parents=True, exist_ok=True)
    return path


@dataclass
class _Start:
    """Where a run begins: a checkpoint (or none) and what its manifest says."""

    checkpoint: str | None = None  # a path, or a URI on object storage
    epoch: int = 0
    skip: int = 0  # batches of `epoch` trained before the checkpoint (a mid-epoch stop)
    step: int = 0  # optimizer steps taken (the schedule's position)
    prior_seconds: float = 0.0  # training time of the runs before this one
    prior_total: float = 0.0  # their wall time (older checkpoints only stored the training time)
    history: list | None = None  # the epoch records the checkpoint carries (None: an older one)

    @classmethod
    def of(cls, checkpoint: str | None, manifest: dict | None) -> _Start:
        if checkpoint is None:
            return cls()
        extra = manifest.get("extra", {})
        prior = float(extra.get("train_seconds", 0.0))
        return cls(checkpoint, int(manifest["epoch"]), int(extra.get("epoch_batches", 0)),
                   int(manifest["step"]), prior, float(extra.get("total_seconds", prior)),
                   extra.get("metrics"))


def _run_root(cfg, run_dir: Path) -> tuple[Any, str]:
    """(filesystem, path) of the run's directory on its storage: train.storage/<run name> for a
    distributed run, the run directory itself in one process."""
    if cfg.parallel.workers >= 1:
        fs, root = open_storage(resolve_storage(cfg, run_dir))
        return fs, f"{root}/{run_dir.name}"
    return pafs.LocalFileSystem(), str(run_dir.resolve())


def _find_resume(resume: str | Path) -> tuple[Any, str]:
    """(filesystem, checkpoint path) of what --resume names: a checkpoint or a run directory (its
    newest complete checkpoint), a path or a URI (file://, s3://, gs://)."""
    fs, path = open_storage(str(resume))
    if fs.get_file_info(path).type == pafs.FileType.NotFound \
            and not (isinstance(fs, pafs.LocalFileSystem) and _restore_replaced(Path(path))):
        raise CheckpointError(f"checkpoint path {str(resume)!r} does not exist")
    found = find_checkpoint(fs, path)
    if found is None:
        raise CheckpointError(f"{str(resume)!r} holds no checkpoint (expected {MANIFEST}, or "
                              f"{CHECKPOINTS}/step_* with one)")
    return fs, found


def start_point(cfg, run_dir: str | Path | None, resume: str | Path | None) -> tuple[Path, _Start]:
    """The run directory and the start checkpoint, found on the run's storage and verified (every
    file's sha256) before anything runs: --resume's checkpoint, else the newest complete checkpoint
    of the run. An explicit resume from a checkpoint older than the run's newest starts a new
    history: the newer checkpoints move to checkpoints/superseded-<time>/ and metrics.jsonl keeps the
    epochs up to the start."""
    fs = found = None
    if resume is not None:
        fs, found = _find_resume(resume)
        parent = os.path.dirname(found)
        if run_dir is None and os.path.basename(parent) == CHECKPOINTS:  # resuming a run: keep writing
            root = os.path.dirname(parent)  # into it: its directory, or under train.storage (or on
            in_storage = bool(cfg.train.storage) and cfg.parallel.workers >= 1 and \
                storage_uri(fs, os.path.dirname(root)) == storage_uri(*open_storage(cfg.train.storage))
            local = isinstance(fs, pafs.LocalFileSystem) and not in_storage  # object storage) the
            run_dir = root if local else Path(cfg.train.out_dir) / os.path.basename(root)  # run's name
    run_dir = make_run_dir(cfg, run_dir)
    run_fs, root = _run_root(cfg, run_dir)
    if found is None:
        on_storage = stored_checkpoints(run_fs, root)
        fs, found = run_fs, (on_storage[-1] if on_storage else None)
    if found is None:
        rebuild_metrics(run_dir / "metrics.jsonl", [], upto=0)
        return run_dir, _Start()
    manifest = verify_stored(fs, found)
    if resume is not None:
        moved = supersede(run_fs, root, int(manifest["step"]), time.strftime("%Y%m%d-%H%M%S"))
        if moved:
            print(f"resuming from an earlier checkpoint: {len(moved)} newer checkpoint(s) moved to "
                  f"{os.path.dirname(moved[0])}", file=sys.stderr)
    start = _Start.of(storage_uri(fs, found), manifest)
    rebuild_metrics(run_dir / "metrics.jsonl", start.history, upto=start.epoch)
    return run_dir, start


def run_training(cfg, run_dir: str | Path | None = None, *, resume: str | Path | None = None,
                 progress: bool = True, callbacks: list | None = None) -> dict[str, Any]:
    """Train (or resume) one run and evaluate it on the test split; returns the result dict that
    launch/train.py prints. `resume` is a checkpoint or run dir to start from (a path or a storage
    URI); without it, a run dir whose storage holds a checkpoint resumes from its newest complete one
    (start_point).

    parallel.workers >= 1 runs under Ray Train (raytrain.fit; `callbacks` are its UserCallbacks, e.g.
    Tune's) on parallel.replicas x parallel.workers ranks; 0 runs the same loop in this process."""
    t_start = time.perf_counter()
    torch.manual_seed(cfg.train.seed)
    # data errors surface before anything is written: a streamed dataset is checked without loading
    # it (train/feed.check_stream), an in-memory one is loaded here (and again by every rank)
    stream = check_stream(cfg) if cfg.data.streaming else None
    splits = load_dataset(cfg) if stream is None else None
    run_dir, start = start_point(cfg, run_dir, resume)  # verified before any rank starts
    save_config(cfg, run_dir)
    bpe = batches_per_epoch(stream["rows"]["train"] if stream else len(splits.train), cfg.train.batch_size)
    log = (lambda msg: tqdm.write(msg, file=sys.stderr)) if progress else (lambda msg: None)
    if start.checkpoint is not None:
        log(f"resuming from {start.checkpoint} (epoch {start.epoch}, +{start.skip} batches)")
    if cfg.parallel.workers >= 1:  # every rank runs the loop, under Ray Train
        from layerpar.train.raytrain import fit

        out = fit(cfg, run_dir, start_from=start.checkpoint, bpe=bpe, stream=stream,
                  initial=start.epoch * bpe + start.skip, progress=progress, callbacks=callbacks)
        result = {"run_dir": str(run_dir), **out, "kind": cfg.model.kind, "mode": cfg.train.mode,
                  "dataset": cfg.data.name}
    else:
        result = _one_process(cfg, run_dir, splits, start, bpe, log, progress, t_start=t_start,
                              stream=stream)
    result["total_seconds"] = round(start.prior_total + time.perf_counter() - t_start, 3)  # >= train
    (run_dir / "result.json").write_text(json.dumps(result, indent=1) + "\n")
    return result


class LocalHost:
    """Where the loop's events go in one process: a progress bar, metrics.jsonl and the log."""

    def __init__(self, cfg, run_dir: Path, bpe: int, start: _Start, log, progress: bool) -> None:
        self.cfg, self.run_dir, self.bpe, self.log = cfg, run_dir, bpe, log
        self.bar = tqdm(total=cfg.train.epochs * bpe, initial=start.epoch * bpe + start.skip,
                        file=sys.stderr, disable=not (progress and sys.stderr.isatty()),
                        dynamic_ncols=True, unit="batch", desc="train")

    def started(self, event: dict) -> None:
        return None

    def step(self, event: dict) -> None:
        self.bar.n = event["epoch"] * self.bpe + event["batch"]
        self.bar.set_postfix(epoch=event["epoch"] + 1, loss=f"{event['loss']:.4f}", refresh=False)
        self.bar.refresh()

    def epoch(self, record: dict, path: str | None, saved: bool) -> None:
        add_metric(self.run_dir / "metrics.jsonl", record)
        acc = "n/a" if record["val_accuracy"] is None else f"{record['val_accuracy']:.4f}"
        loss = "n/a" if record["train_loss"] is None else f"{record['train_loss']:.4f}"
        self.log(f"epoch {record['epoch']}/{self.cfg.train.epochs} loss {loss} val_acc {acc} "
                 f"lr {record['lr']:.2e} {record['seconds']:.1f}s")
        if "epoch_batches" in record:
            self.log(f"stopping: train.max_minutes ({self.cfg.train.max_minutes}) reached")

    def final(self, record: dict) -> None:
        self.bar.close()


def _one_process(cfg, run_dir: Path, splits, start: _Start, bpe: int, log, progress: bool, *,
                 t_start: float, stream: dict | None = None) -> dict[str, Any]:
    """The loop as a world of one in this process (parallel.workers = 0); a streamed dataset is read
    by Ray Data (a local Ray is started if none is running)."""
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    fs, root = _run_root(cfg, run_dir)
    total_steps = cfg.train.epochs * bpe * len(prefix_plan(cfg))
    shard = shard_class(cfg)(cfg, worker_rank=0, total_steps=total_steps)  # lm_shard: an LM's
    comm = TimedComm(shard.comms[1])  # LocalComm: every collective verb is the identity
    host = LocalHost(cfg, run_dir, bpe, start, log, progress)
    owns_ray, feed = False, None
    if stream is not None:
        from layerpar.parallel.cluster import connect

        owns_ray = connect(cfg, min_cpus=1 + max(1, cfg.data.read_parallelism))
        feed = StreamingFeed(cfg, comm, rows=stream["rows"], catalog=stream["catalog"],
                             stats=stream["stats"])
    try:
        config = {"start": start.checkpoint, "attempt": f"local-{uuid.uuid4().hex[:6]}"}
        run = RankRun(cfg, config, host, shard=shard, comm=comm, splits=splits, fs=fs, root=root,
                      t0=t_start, feed=feed)
        log(f"run {run_dir}: {cfg.model.kind} params={_params(shard)} workers=0 transport=local "
            f"epochs={cfg.train.epochs} steps={total_steps} precision={cfg.train.precision}"
            + (f" compile={shard.compile_s:.1f}s" if cfg.model.compile else ""))
        m = run_rank(run)
    finally:
        host.bar.close()
        if owns_ray:
            import ray

            ray.shutdown()
    ckpt = m["checkpoint"]
    return {
        "run_dir": str(run_dir), "test_accuracy": m["test_accuracy"], "test_loss": m["test_loss"],
        "val_accuracy": m["val_accuracy"], "prefix_accuracy": m["prefix_accuracy"],
        "train_seconds": m["train_seconds"], "params": m["params"], "workers": 0,
        "worker_nodes": [], "transport": "local", "kind": cfg.model.kind, "mode": cfg.train.mode,
        "dataset": cfg.data.name, "epochs": m["epochs"], "steps": m["steps"],
        "stopped_early": m["stopped_early"], "checkpoint": None if ckpt is None else str(ckpt),
        "failures": 0, "restarts": [], "storage": str(run_dir), "phases": m["phases"],
        "trainer": "local", **{k: v for k, v in m.items() if "bits_per_byte" in k},  # a language model's
    }


def _params(shard: BranchShard) -> int:
    return sum(p.numel() for p in shard.model.parameters())


# ----------------------------------------------------------------------------- command line


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="layerpar train", description="Train a Para-Former (or the serial "
                                 "ViT baseline); the last stdout line is the result as JSON.")
    ap.add_argument("--config", default="digits", help="YAML path or packaged config name (default digits)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override one config field, e.g. train.epochs=5 (repeatable)")
    ap.add_argument("--run-dir", default=None, help="run directory (default: a new one under --out-dir); "
                    "resumes from its latest checkpoint if it holds one")
    ap.add_argument("--out-dir", default=None, help="parent of new run directories (train.out_dir)")
    ap.add_argument("--resume", default=None, help="checkpoint or run directory to continue from")
    ap.add_argument("--address", default=None, help="Ray cluster address (parallel.address), e.g. auto")
    ap.add_argument("--quiet", action="store_true", help="no progress output on stderr")
    return ap.parse_args(argv)


def cli_main(argv: list[str] | None = None) -> int:
    """`python launch/train.py ...` and `layerpar train ...`: a bad config, a missing dataset or a bad
    checkpoint prints one line on stderr and returns 2."""
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        if args.out_dir is not None:  # set directly: a path is not parsed as YAML
            cfg = cfg.replace(train={"out_dir": args.out_dir})
        if args.address is not None:
            cfg = cfg.replace(parallel={"address": args.address})
        result = run_training(cfg, args.run_dir, resume=args.resume, progress=not args.quiet)
    except (ConfigError, DataError, CheckpointError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except RuntimeError as exc:  # raytrain.TrainingError, ClusterError: one line, not a traceback
        if type(exc).__name__ not in ("TrainingError", "ClusterError"):
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(result), flush=True)
    return 0
