"""The training loop: data -> backend -> epochs (train, validate, checkpoint) -> test.

    result = run_training(load_config("digits"))            # a new run dir under train.out_dir
    result = run_training(cfg, run_dir="runs/my-run")        # resumes if the dir holds a checkpoint

The same loop drives a LocalBackend (one process) or the Ray Engine (parallel.workers >= 1). It is
deterministic given the seeds: weights from train.seed, batch order from data.seed and the epoch, so a
run resumed from a checkpoint -- even one taken mid-epoch by the time budget -- continues exactly as
the uninterrupted run would.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from layerpar.config import ConfigError, load_config, save_config
from layerpar.data import DataError, batches, batches_per_epoch, load_dataset
from layerpar.data.augment import augment
from layerpar.train.checkpoint import (
    CHECKPOINTS,
    CheckpointError,
    latest_checkpoint,
    read_manifest,
    resolve_checkpoint,
)
from layerpar.train.evaluate import evaluate
from layerpar.train.local import LocalBackend
from layerpar.train.step import prefix_plan


def run_name(cfg) -> str:
    """Default run directory name: 20250101-120000-digits-paraformer[-progressive]."""
    mode = "-progressive" if cfg.train.mode == "progressive" and cfg.model.kind == "paraformer" else ""
    return f"{time.strftime('%Y%m%d-%H%M%S')}-{cfg.data.name}-{cfg.model.kind}{mode}"


def make_run_dir(cfg, run_dir: str | Path | None) -> Path:
    """The given run dir (created if needed), or a new timestamped one under train.out_dir."""
    if run_dir is not None:
        path = Path(run_dir)
        path.mkdir(parents=True, exist_ok=True)
        return path
    base = Path(cfg.train.out_dir) / run_name(cfg)
    path, n = base, 1
    while path.exists():  # two runs started in the same second
        n += 1
        path = base.with_name(f"{base.name}-{n}")
    path.mkdir(parents=True)
    return path


def _append_jsonl(path: Path, record: dict[str, Any]) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def train_epoch(backend, split, cfg, *, epoch: int, skip: int, step: int, bar,
                deadline: float | None) -> tuple[list[float], float, int, int]:
    """One pass over the training split from batch `skip` on; stops early (mid-epoch) once
    time.perf_counter() passes `deadline`. Returns (losses, last lr, batches done, optimizer step)."""
    losses, lr, done = [], 0.0, skip
    order = batches(split, cfg.train.batch_size, seed=cfg.data.seed, epoch=epoch)  # fixed by (seed, epoch)
    for i, (x, y) in enumerate(order):
        if i < skip:  # resumed mid-epoch: these batches were trained before the checkpoint
            continue
        x = augment(x, kind=cfg.data.augment, seed=cfg.data.seed, epoch=epoch, index=i)
        out = backend.train_step(x, y)
        losses.append(out["loss"])
        lr, done, step = out["lr"], i + 1, out["step"]
        bar.update(1)
        bar.set_postfix(epoch=epoch + 1, loss=f"{out['loss']:.4f}", refresh=False)
        if deadline is not None and time.perf_counter() > deadline:
            break  # the caller sees done < batches per epoch and checkpoints mid-epoch
    return losses, lr, done, step


def run_training(cfg, run_dir: str | Path | None = None, *, resume: str | Path | None = None,
                 progress: bool = True, callbacks: list | None = None,
                 backend_factory=None) -> dict[str, Any]:
    """Train (or resume) one run and evaluate it on the test split; returns the result dict that
    launch/train.py prints. `resume` is a checkpoint or run dir to start from; without it, a run dir
    that already holds a checkpoint resumes from its latest.

    parallel.workers >= 1 runs under Ray Train (raytrain.fit; `callbacks` are its UserCallbacks, e.g.
    Tune's); 0 trains a LocalBackend in this process. `backend_factory(cfg, total_steps=...,
    checkpoint=...)` instead makes the backend this loop drives step by step: runtime/restart.py
    passes the runtime Engine (the old driver-fed path, kept for the tests that need an Engine
    whose weights move)."""
    t_start = time.perf_counter()
    torch.manual_seed(cfg.train.seed)
    splits = load_dataset(cfg)  # data errors surface before anything is written
    start_from = resolve_checkpoint(resume) if resume is not None else None
    if start_from is not None and run_dir is None and start_from.parent.name == CHECKPOINTS:
        run_dir = start_from.parent.parent  # resuming a run: keep writing into it
    run_dir = make_run_dir(cfg, run_dir)
    save_config(cfg, run_dir)
    if start_from is None:
        start_from = latest_checkpoint(run_dir)

    t = cfg.train
    bpe = batches_per_epoch(int(splits.train.y.shape[0]), t.batch_size)
    total_steps = t.epochs * bpe * len(prefix_plan(cfg))
    start_epoch, skip, prior_seconds, prior_total, step = 0, 0, 0.0, 0.0, 0
    if start_from is not None:
        manifest = read_manifest(start_from)
        extra = manifest.get("extra", {})
        start_epoch, skip = int(manifest["epoch"]), int(extra.get("epoch_batches", 0))
        step = int(manifest["step"])  # optimizer steps taken (the schedule's position)
        prior_seconds = float(extra.get("train_seconds", 0.0))
        # wall time of the runs before this one (older checkpoints only stored their training time)
        prior_total = float(extra.get("total_seconds", prior_seconds))
    eval_bs = max(t.batch_size, 256)
    metrics_path = run_dir / "metrics.jsonl"
    log = (lambda msg: tqdm.write(msg, file=sys.stderr)) if progress else (lambda msg: None)
    if start_from is not None:
        log(f"resuming from {start_from} (epoch {start_epoch}, +{skip} batches)")

    if cfg.parallel.workers >= 1 and backend_factory is None:  # every rank runs the loop, under Ray Train
        from layerpar.train.raytrain import fit

        out = fit(cfg, run_dir, start_from=start_from, bpe=bpe, initial=start_epoch * bpe + skip,
                  progress=progress, callbacks=callbacks)
        total = round(prior_total + time.perf_counter() - t_start, 3)  # >= train_seconds (issue 14)
        result = {"run_dir": str(run_dir), **out, "kind": cfg.model.kind, "mode": t.mode,
                  "dataset": cfg.data.name, "total_seconds": total}
        (run_dir / "result.json").write_text(json.dumps(result, indent=1) + "\n")
        return result

    backend = None
    bar = None
    try:
        backend = (backend_factory or LocalBackend)(cfg, total_steps=total_steps, checkpoint=start_from)
        info = backend.info()
        log(f"run {run_dir}: {cfg.model.kind} params={info['params']} workers={info['workers']} "
            f"transport={info['transport']} epochs={t.epochs} steps={total_steps}")
        bar = tqdm(total=t.epochs * bpe, initial=start_epoch * bpe + skip, file=sys.stderr,
                   disable=not (progress and sys.stderr.isatty()), dynamic_ncols=True, unit="batch",
                   desc="train")
        t_train = time.perf_counter()
        budget_s = t.max_minutes * 60.0
        stopped_early, val, last_ckpt = False, None, start_from
        for epoch in range(start_epoch, t.epochs):
            t_epoch = time.perf_counter()
            deadline = t_train + budget_s if budget_s else None
            losses, lr, done, step = train_epoch(backend, splits.train, cfg, epoch=epoch, skip=skip,
                                                 step=step, bar=bar, deadline=deadline)
            stopped_early = done < bpe  # the budget ran out mid-epoch; the checkpoint says where
            skip = 0
            val = evaluate(backend, splits.val, eval_bs)
            elapsed = time.perf_counter() - t_train
            record = {
                "epoch": epoch + (0 if stopped_early else 1),
                "step": step,
                "train_loss": sum(losses) / len(losses) if losses else None,
                "val_accuracy": val["accuracy"],
                "val_loss": val["loss"],
                "val_prefix_accuracy": val["prefix_accuracy"],
                "lr": lr,
                "seconds": round(time.perf_counter() - t_epoch, 3),
                "train_seconds": round(prior_seconds + elapsed, 3),
            }
            if stopped_early:
                record["epoch_batches"] = done
            _append_jsonl(metrics_path, record)
            acc = "n/a" if val["accuracy"] is None else f"{val['accuracy']:.4f}"
            loss = "n/a" if record["train_loss"] is None else f"{record['train_loss']:.4f}"
            log(f"epoch {epoch + 1}/{t.epochs} loss {loss} val_acc {acc} "
                f"lr {lr:.2e} {record['seconds']:.1f}s")
            finished = epoch + 1 == t.epochs
            over_budget = bool(budget_s) and elapsed > budget_s
            if stopped_early or finished or over_budget or (epoch + 1) % t.checkpoint_every == 0:
                extra = {"train_seconds": prior_seconds + elapsed,
                         "total_seconds": prior_total + time.perf_counter() - t_start}
                if stopped_early:
                    extra.update(epoch_batches=done, stopped_early=True)
                last_ckpt = backend.save(run_dir, epoch=epoch + (0 if stopped_early else 1),
                                         extra=extra)
            if stopped_early or over_budget:
                stopped_early = stopped_early or not finished
                if stopped_early:
                    log(f"stopping: train.max_minutes ({t.max_minutes}) reached")
                break
        bar.close()
        train_seconds = prior_seconds + (time.perf_counter() - t_train)

        test = evaluate(backend, splits.test, eval_bs)
        if val is None:  # nothing left to train (resumed a finished run)
            val = evaluate(backend, splits.val, eval_bs)
        info = backend.info()
        result = {
            "run_dir": str(run_dir),
            "test_accuracy": test["accuracy"],
            "test_loss": test["loss"],
            "val_accuracy": val["accuracy"],
            "prefix_accuracy": test["prefix_accuracy"],
            "train_seconds": round(train_seconds, 3),
            "total_seconds": round(prior_total + time.perf_counter() - t_start, 3),
            "params": info["params"],
            "workers": info["workers"],
            "worker_nodes": info.get("nodes", []),  # Ray node id of each worker ([] in-process)
            "transport": info["transport"],
            "kind": cfg.model.kind,
            "mode": t.mode,
            "dataset": cfg.data.name,
            "epochs": read_manifest(last_ckpt)["epoch"] if last_ckpt is not None else 0,
            "steps": step,
            "stopped_early": stopped_early,
            "checkpoint": str(last_ckpt) if last_ckpt is not None else None,
            "failures": 0, "restarts": [], "storage": str(run_dir), "phases": [],
            "trainer": "local" if cfg.parallel.workers < 1 else "layerpar Engine (driver-fed)",
        }
        (run_dir / "result.json").write_text(json.dumps(result, indent=1) + "\n")
        return result
    finally:
        if bar is not None:
            bar.close()
        if backend is not None:
            backend.shutdown()  # always: a Ray engine holds actors and a placement group


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
