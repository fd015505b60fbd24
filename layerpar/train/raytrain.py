"""The driver side of distributed training: launch a Ray Train TorchTrainer and watch it.

    result = fit(cfg, run_dir, start_from=None, bpe=22)     # called by loop.run_training (W >= 1)

parallel.* becomes the ScalingConfig (workers, CPUs/GPUs per worker, placement strategy),
train.max_failures the FailureConfig, train.storage (default: the run directory's parent, so the
checkpoints land in RUN_DIR/checkpoints) the RunConfig's storage_path, with the run directory's name as
the run's name. Ray 2.60 runs Ray Train v2 (the default generation); its controller restarts the whole
worker group after a lost worker. Where the ranks start is not Ray Train's choice: the driver names the
start checkpoint (found and verified on storage), and after a restart the ranks take the newest complete
checkpoint this attempt wrote (rank_loop.restart_point). Ray Train v2 would offer its last *registered*
checkpoint, which lags the newest on storage, and, for a run of the same name and storage, the one an
earlier attempt left in its snapshot. Rank 0 prunes old checkpoints (train.keep_checkpoints); Ray
Train deletes none. The driver holds no weights and
feeds no batches: it shows a progress bar from what rank 0 pushes to a small ProgressLog actor, writes
metrics.jsonl, and builds the result from rank 0's final report.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import re
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs
import ray
from tqdm import tqdm

from layerpar.data import DataError
from layerpar.train.metrics_log import add_metric
from layerpar.train.shard_checkpoint import open_storage, resolve_storage, storage_uri

__all__ = ["fit", "resolve_storage", "ProgressLog", "TrainingError", "Watcher"]

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
        self.started_from: str | None = None  # what the first group restored (rank 0's start event)
        self._lock = threading.Lock()  # one poll at a time: stop() may poll beside a late run()
        self.nodes: dict[int, str] = {}
        self.pids: dict[int, list[int]] = {}
        self.killed: list[dict] = []
        self.final: dict | None = None
        self._halt, self._rate = threading.Event(), (0, time.time())

    def run(self) -> None:
        while not self._halt.wait(0.5):
            self.poll()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop polling and take the events not seen yet. A poll still running after `timeout` (a
        slow actor) is waited for, not run beside: the same events would be taken twice."""
        self._halt.set()
        self.join(timeout=timeout)
        self.poll()

    def poll(self) -> None:
        with self._lock:
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
        if self.groups == 1:
            self.started_from = e["restored"]
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
        add_metric(self.metrics_path, r)  # keyed by epoch: an epoch trained again stays one line
        acc = "n/a" if r["val_accuracy"] is None else f"{r['val_accuracy']:.4f}"
        loss = "n/a" if r["train_loss"] is None else f"{r['train_loss']:.4f}"
        self.say(f"epoch {r['epoch']} loss {loss} val_acc {acc} lr {r['lr']:.2e} {r['seconds']:.1f}s")

    def _on_final(self, e: dict) -> None:
        self.final = e["record"]

    def _on_killed(self, e: dict) -> None:
        self.killed.append(e)


def _trainer(cfg, name: str, storage: str, config: dict, callbacks: list | None):
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
        # rank 0 prunes the checkpoints (spmd: by step, on storage), so Ray Train deletes none
        run_config=RunConfig(name=name, storage_path=storage,
                             failure_config=FailureConfig(max_failures=cfg.train.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=None),
                             callbacks=callbacks or [],
                             logging_config=LoggingConfig(log_level="WARNING")))  # no per-report lines


def _chaos_spec() -> dict | None:
    """Tests only. LAYERPAR_CHAOS_KILL="epoch=E,rank=R[,when=saved]": see spmd._chaos;
    LAYERPAR_CHAOS_SLOW_PUBLISH=S: rank 0 takes S seconds more to publish each checkpoint."""
    spec: dict = {}
    raw = os.environ.get("LAYERPAR_CHAOS_KILL")
    if raw:
        parts = dict(kv.split("=", 1) for kv in raw.split(","))
        spec.update(epoch=int(parts["epoch"]), rank=int(parts["rank"]), when=parts.get("when", "reported"))
        if "batch" in parts:  # mid-epoch: as the rank is handed batch K of epoch E (spmd._ChaosFeed)
            spec.update(when="batch", batch=int(parts["batch"]))
    if os.environ.get("LAYERPAR_CHAOS_SLOW_PUBLISH"):
        spec["slow_publish_s"] = float(os.environ["LAYERPAR_CHAOS_SLOW_PUBLISH"])
    return spec or None


_RAISED = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Timeout|Interrupt)\w*: ")


def _cause(exc: Exception) -> str:
    """The one line that says why Ray Train gave up: a rank's own error (the last line of its
    traceback), not the header of Ray's."""
    failures = getattr(exc, "worker_failures", None) or {}
    cause = next(iter(failures.values()), None) if failures else getattr(exc, "controller_failure", None)
    lines = [ln.strip() for ln in str(cause if cause is not None else exc).strip().splitlines() if ln.strip()]
    raised = [ln for ln in lines if _RAISED.match(ln)]  # "SomeError: message", a traceback's last line
    return (raised[-1] if raised else lines[0] if lines else type(exc).__name__)[:400]


@contextlib.contextmanager
def ray_log(run_dir: Path, say):
    """Ray's driver-side log lines go to RUN_DIR/ray.log for the run, with where Ray keeps the workers'
    output (not shown here when RAY_LOG_TO_DRIVER=0, as launch/train.py sets it)."""
    path = run_dir / "ray.log"
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logger = logging.getLogger("ray")
    saved = logger.handlers[:], logger.propagate
    logger.handlers, logger.propagate = [handler], False
    try:
        node = getattr(ray._private.worker, "_global_node", None)
        if node is not None:
            handler.stream.write(f"Ray's worker and actor output: {node.get_logs_dir_path()}\n")
        say(f"Ray's log: {path}")
        yield path
    finally:
        logger.handlers, logger.propagate = saved
        handler.close()


def _forget_snapshot(fs, run_root: str) -> None:
    """Remove Ray Train v2's checkpoint list of an earlier attempt of this run (its snapshot in the
    run's directory). Ray Train would restore it under the same name and storage, hand the ranks its
    last registered checkpoint, and refuse to start once rank 0 has pruned one it lists; the driver
    names the start checkpoint itself (loop.start_point)."""
    try:
        from ray.train.v2._internal.constants import CHECKPOINT_MANAGER_SNAPSHOT_FILENAME as name
    except ImportError:  # another Ray release: its file name
        name = "checkpoint_manager_snapshot.json"
    path = f"{run_root}/{name}"
    if fs.get_file_info(path).type == pafs.FileType.File:
        fs.delete_file(path)


def fit(cfg, run_dir: Path, *, start_from: str | None, bpe: int, initial: int = 0,
        progress: bool = True, callbacks: list | None = None, stream: dict | None = None) -> dict[str, Any]:
    """Run the TorchTrainer to the end; returns the run's result fields (loop.run_training adds the
    rest). `start_from`: the start checkpoint (a path or URI), found and verified by the caller: the
    ranks start from it, and from this attempt's own newest checkpoint after a restart. Raises
    TrainingError when Ray Train gives up (DataError when a rank's data was bad: an unreadable file).
    `stream` (data.streaming): the driver's check_stream; its catalog goes to the object store once
    and only the branch groups' leaders fetch it. A local Ray then gets a CPU per replica more than
    the ranks take, for the Ray Data decode tasks."""
    from ray.train import TrainingFailedError

    from layerpar.parallel.cluster import connect

    # The Ray dashboard's Train view lists a run only when its driver tracks the run's state.
    os.environ.setdefault("RAY_TRAIN_ENABLE_STATE_TRACKING", "1")
    p = cfg.parallel
    owns_ray = connect(cfg, min_cpus=math.ceil(p.workers * p.replicas * p.cpus_per_worker)
                       + p.replicas * max(1, cfg.data.read_parallelism) if stream else 0)
    storage = resolve_storage(cfg, run_dir)
    fs, root = open_storage(storage)
    say = (lambda msg: tqdm.write(msg, file=sys.stderr)) if progress else (lambda msg: None)
    bar = tqdm(total=cfg.train.epochs * bpe, initial=initial, file=sys.stderr, unit="batch", desc="train",
               disable=not (progress and sys.stderr.isatty()), dynamic_ncols=True)
    log = ProgressLog.remote()
    watcher = Watcher(log, run_dir / "metrics.jsonl", bar, say)
    watcher.bar_per_epoch = bpe
    # epochs without a checkpoint are reported only to a listener (Tune): see layerpar.train.spmd
    attempt = f"{run_dir.name}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    config = {"cfg": cfg.to_dict(), "start": start_from, "progress": log, "root": f"{root}/{run_dir.name}",
              "attempt": attempt, "report_epochs": bool(callbacks), "chaos": _chaos_spec()}
    if stream is not None:
        config["stream"] = {"catalog": ray.put(stream["catalog"]), "stats": stream["stats"],
                            "rows": stream["rows"]}
    ranks = cfg.parallel.workers * cfg.parallel.replicas
    mesh = f"{cfg.parallel.replicas} replicas x {cfg.parallel.workers} branch ranks" \
        if cfg.parallel.replicas > 1 else f"{cfg.parallel.workers} workers"
    say(f"run {run_dir}: {TRAINER}, {mesh}, storage {storage}")
    _forget_snapshot(fs, f"{root}/{run_dir.name}")
    watcher.start()
    try:
        with ray_log(run_dir, say):
            result = _trainer(cfg, run_dir.name, storage, config, callbacks).fit()
    except TrainingFailedError as exc:
        if _cause(exc).startswith(("DataError: ", "layerpar.data.base.DataError: ")):
            raise DataError(_cause(exc).split(": ", 1)[1]) from exc
        raise TrainingError(f"distributed training failed (train.max_failures={cfg.train.max_failures}): "
                            f"{_cause(exc)}") from exc
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
        "started_from": watcher.started_from,
        "storage": storage_uri(fs, f"{root}/{run_dir.name}"), "phases": m["phases"],
        "worker_pids": [watcher.pids.get(r, []) for r in range(ranks)],
        **({"chaos_kills": watcher.killed} if watcher.killed else {}),
        **{k: v for k, v in m.items() if "bits_per_byte" in k},  # a language model's
    }
