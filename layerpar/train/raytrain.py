"""The driver side of distributed training: launch a Ray Train TorchTrainer and watch it.

    result = fit(cfg, run_dir, start_from=None, bpe=22)     # called by loop.run_training (W >= 1)

parallel.* becomes the ScalingConfig (workers, CPUs/GPUs per worker, placement strategy),
train.max_failures the FailureConfig, train.storage (default: the run directory's parent, so the
checkpoints land in RUN_DIR/checkpoints) the RunConfig's storage_path, with the run directory's name as
the run's name. Ray 2.60 runs Ray Train v2 (the default generation); its controller restarts the whole
worker group from the latest reported checkpoint after a lost worker. The driver holds no weights and
feeds no batches: it shows a progress bar from what rank 0 pushes to a small ProgressLog actor, writes
metrics.jsonl, and builds the result from rank 0's final report.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

import ray
from tqdm import tqdm

from layerpar.train.shard_checkpoint import open_storage, storage_uri

TRAINER = "ray.train.torch.TorchTrainer (Ray Train v2)"


class TrainingError(RuntimeError):
    """Distributed training failed for good (more lost workers than train.max_failures, or an error
    in the loop); the message is one line."""


@ray.remote(num_cpus=0)
class ProgressLog:
    """Events from the ranks, in arrival order, for the driver to poll."""

    def __init__(self) -> None:
        self.events: list[dict] = []

    def push(self, event: dict) -> None:
        self.events.append(event)

    def since(self, index: int) -> list[dict]:
        return self.events[index:]


class Watcher(threading.Thread):
    """Polls the ProgressLog: progress bar, metrics.jsonl, restarts and worker nodes."""

    def __init__(self, log, metrics_path: Path, bar, say) -> None:
        super().__init__(daemon=True)
        self.log, self.metrics_path, self.bar, self.say = log, metrics_path, bar, say
        self.seen, self.groups, self.restarts = 0, 0, []
        self.nodes: dict[int, str] = {}
        self.pids: dict[int, list[int]] = {}
        self.killed: list[dict] = []
        self.final: dict | None = None
        self._halt, self._rate = threading.Event(), (0, time.time())

    def run(self) -> None:
        while not self._halt.wait(0.5):
            self.poll()

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=10)
        self.poll()

    def poll(self) -> None:
        try:
            events = ray.get(self.log.since.remote(self.seen), timeout=30)
        except (ray.exceptions.GetTimeoutError, ray.exceptions.RayActorError):
            return
        self.seen += len(events)
        for e in events:
            getattr(self, "_on_" + e["kind"])(e)

    def _on_start(self, e: dict) -> None:
        self.nodes[e["rank"]] = e["node"]
        self.pids.setdefault(e["rank"], []).append(e["pid"])
        if e["rank"] != 0:
            return
        self.groups += 1
        if self.groups > 1:  # Ray Train restarted the worker group
            self.restarts.append({"checkpoint": e["restored"], "epoch": e["epoch"], "step": e["step"]})
            self.say(f"worker group restarted by Ray Train from {e['restored'] or 'the start'} "
                     f"(epoch {e['epoch']}, failure {len(self.restarts)})")

    def _on_step(self, e: dict) -> None:
        samples, t = e["samples"], e["t"]
        rate = (samples - self._rate[0]) / max(1e-9, t - self._rate[1]) if samples > self._rate[0] else 0.0
        self._rate = (samples, t)
        self.bar.n = e["epoch"] * self.bar_per_epoch + e["batch"]
        self.bar.set_postfix(epoch=e["epoch"] + 1, loss=f"{e['loss']:.4f}", samples_s=f"{rate:,.0f}",
                             refresh=False)
        self.bar.refresh()

    def _on_epoch(self, e: dict) -> None:
        r = e["record"]
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(r) + "\n")
        acc = "n/a" if r["val_accuracy"] is None else f"{r['val_accuracy']:.4f}"
        loss = "n/a" if r["train_loss"] is None else f"{r['train_loss']:.4f}"
        self.say(f"epoch {r['epoch']} loss {loss} val_acc {acc} lr {r['lr']:.2e} {r['seconds']:.1f}s")

    def _on_final(self, e: dict) -> None:
        self.final = e["record"]

    def _on_killed(self, e: dict) -> None:
        self.killed.append(e)


def _trainer(cfg, run_dir: Path, storage: str, config: dict, callbacks: list | None):
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from layerpar.train.spmd import train_loop_per_worker

    p, gpus = cfg.parallel, cfg.parallel.gpus_per_worker
    resources = {"CPU": p.cpus_per_worker, **({"GPU": gpus} if gpus > 0 else {})}
    return TorchTrainer(
        train_loop_per_worker, train_loop_config=config,
        # R replicas x W branch ranks: the (replica, branch) mesh (parallel.replicas; 1 is one group)
        scaling_config=ScalingConfig(num_workers=p.workers * p.replicas, use_gpu=gpus > 0,
                                     resources_per_worker=resources, placement_strategy=p.placement),
        # NCCL between GPUs, gloo between CPUs; a collective waits at most parallel.timeout_s
        torch_config=TorchConfig(backend="nccl" if gpus > 0 else "gloo", timeout_s=int(p.timeout_s)),
        run_config=RunConfig(name=run_dir.name, storage_path=storage,
                             failure_config=FailureConfig(max_failures=cfg.train.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=cfg.train.keep_checkpoints),
                             callbacks=callbacks or [],
                             logging_config=LoggingConfig(log_level="WARNING")))  # no per-report lines


def _chaos_spec() -> dict | None:
    """LAYERPAR_CHAOS_KILL="epoch=E,rank=R" (tests only): see spmd._chaos."""
    import os

    raw = os.environ.get("LAYERPAR_CHAOS_KILL")
    if not raw:
        return None
    parts = dict(kv.split("=", 1) for kv in raw.split(","))
    return {"epoch": int(parts["epoch"]), "rank": int(parts["rank"])}


def resolve_storage(cfg, run_dir: Path) -> str:
    """train.storage, or the run directory's parent (absolute: Ray Train needs one)."""
    storage = cfg.train.storage or str(run_dir.resolve().parent)
    return storage if "://" in storage else str(Path(storage).expanduser().resolve())


def fit(cfg, run_dir: Path, *, start_from: Path | None, bpe: int, initial: int = 0,
        progress: bool = True, callbacks: list | None = None) -> dict[str, Any]:
    """Run the TorchTrainer to the end; returns the run's result fields (loop.run_training adds the
    rest). Raises TrainingError when Ray Train gives up."""
    from ray.train import TrainingFailedError

    from layerpar.parallel.cluster import connect

    # The Ray dashboard's Train view lists a run only when its driver tracks the run's state.
    os.environ.setdefault("RAY_TRAIN_ENABLE_STATE_TRACKING", "1")
    owns_ray = connect(cfg)
    storage = resolve_storage(cfg, run_dir)
    fs, root = open_storage(storage)
    say = (lambda msg: tqdm.write(msg, file=sys.stderr)) if progress else (lambda msg: None)
    bar = tqdm(total=cfg.train.epochs * bpe, initial=initial, file=sys.stderr, unit="batch", desc="train",
               disable=not (progress and sys.stderr.isatty()), dynamic_ncols=True)
    log = ProgressLog.remote()
    watcher = Watcher(log, run_dir / "metrics.jsonl", bar, say)
    watcher.bar_per_epoch = bpe
    # epochs without a checkpoint are reported only to a listener (Tune): see layerpar.train.spmd
    config = {"cfg": cfg.to_dict(), "start": str(start_from) if start_from else None, "progress": log,
              "report_epochs": bool(callbacks), "chaos": _chaos_spec()}
    ranks = cfg.parallel.workers * cfg.parallel.replicas
    mesh = f"{cfg.parallel.replicas} replicas x {cfg.parallel.workers} branch ranks" \
        if cfg.parallel.replicas > 1 else f"{cfg.parallel.workers} workers"
    say(f"run {run_dir}: {TRAINER}, {mesh}, storage {storage}")
    watcher.start()
    try:
        result = _trainer(cfg, run_dir, storage, config, callbacks).fit()
    except TrainingFailedError as exc:
        raise TrainingError(f"distributed training failed (train.max_failures={cfg.train.max_failures}): "
                            f"{str(exc).strip().splitlines()[0][:300]}") from exc
    finally:
        watcher.stop()
        bar.close()
        ray.kill(log)
        if owns_ray:
            ray.shutdown()
    m = watcher.final
    if m is None:  # fit() returned, so rank 0 reported; its event cannot be lost, only late
        raise TrainingError(f"the training run in {result.path} ended without its final report")
    ckpt = m["checkpoint"]
    return {
        "test_accuracy": m["test_accuracy"], "test_loss": m["test_loss"], "val_accuracy": m["val_accuracy"],
        "prefix_accuracy": m["prefix_accuracy"], "train_seconds": m["train_seconds"], "params": m["params"],
        "workers": cfg.parallel.workers, "replicas": cfg.parallel.replicas,
        "worker_nodes": [watcher.nodes.get(r) for r in range(ranks)],
        "transport": cfg.parallel.transport, "epochs": m["epochs"], "steps": m["steps"],
        "stopped_early": m["stopped_early"],
        "checkpoint": None if ckpt is None else (ckpt if ckpt == config["start"] else storage_uri(fs, ckpt)),
        "failures": len(watcher.restarts), "restarts": watcher.restarts, "trainer": TRAINER,
        "storage": storage_uri(fs, f"{root}/{run_dir.name}"), "phases": m["phases"],
        "worker_pids": [watcher.pids.get(r, []) for r in range(ranks)],
        **({"chaos_kills": watcher.killed} if watcher.killed else {}),
    }
