"""Automatic restart of a driver-fed Engine training run after a lost worker (train.max_failures).

Superseded: launch/train.py and run_training train distributed runs under Ray Train
(layerpar.train.raytrain), whose controller restarts the worker group itself. This module and the
Engine-driven loop it runs (run_training(backend_factory=Engine)) stay only while
tests/faults/test_training_restart.py exercises them; delete both together.

    result = run_with_restarts(cfg, run_dir="runs/my-run")   # same arguments as run_training

A worker lost mid-run (killed, its node gone, hung past parallel.timeout_s) makes the engine raise
WorkerError; the run's backend is shut down (every worker goes), and the run starts again in the same
run directory, where run_training resumes from the latest checkpoint: a fresh set of workers loads its
weights, AdamW state and step count, and replays the epoch from its first batch. The batch order
depends only on (data.seed, epoch) and the checkpoint holds the exact state, so the finished run's
weights equal those of a run that was never interrupted. After train.max_failures restarts, the next
failure is raised. The result gains `failures` (how many were survived) and `restarts` (from where).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

from layerpar.runtime.engine import Engine, WorkerError
from layerpar.train.checkpoint import CHECKPOINTS, latest_checkpoint, read_manifest, resolve_checkpoint
from layerpar.train.loop import new_run_path, run_training


def run_with_restarts(cfg, run_dir: str | Path | None = None, *, resume: str | Path | None = None,
                      progress: bool = True) -> dict[str, Any]:
    """run_training, restarted from the last checkpoint after each lost worker, up to
    train.max_failures times."""
    if cfg.parallel.workers < 1:  # one process: no worker to lose
        return run_training(cfg, run_dir, resume=resume, progress=progress)
    if run_dir is None and resume is not None:  # as run_training does: resuming a run writes into it
        start = resolve_checkpoint(resume)
        if start.parent.name == CHECKPOINTS:
            run_dir = start.parent.parent
    run_dir = Path(run_dir) if run_dir is not None else new_run_path(cfg)  # fixed for every restart
    restarts: list[dict[str, Any]] = []
    while True:
        # the caller's starting point until this run has written a checkpoint of its own
        start_from = resume if latest_checkpoint(run_dir) is None else None
        t0 = time.perf_counter()
        try:
            result = run_training(cfg, run_dir, resume=start_from, progress=progress,
                                  backend_factory=Engine)
        except WorkerError as exc:
            ckpt = latest_checkpoint(run_dir) or (resolve_checkpoint(resume) if resume else None)
            epoch = read_manifest(ckpt)["epoch"] if ckpt is not None else 0
            restarts.append({"error": str(exc).splitlines()[0], "after_s": round(time.perf_counter() - t0, 3),
                             "checkpoint": str(ckpt) if ckpt else None, "epoch": epoch})
            if len(restarts) > cfg.train.max_failures:
                raise type(exc)(f"{exc} -- giving up after {len(restarts)} worker failure(s) "
                                f"(train.max_failures={cfg.train.max_failures})") from exc
            if progress:
                where = f"{ckpt} (epoch {epoch})" if ckpt else "the start"
                print(f"worker lost: {str(exc).splitlines()[0]}; restarting every worker from {where} "
                      f"(failure {len(restarts)} of at most {cfg.train.max_failures})", file=sys.stderr)
            continue
        result["failures"], result["restarts"] = len(restarts), restarts
        return result
