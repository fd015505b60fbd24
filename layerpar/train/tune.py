"""A Ray Tune sweep over the same Ray Train run (`launch/tune.py`).

    result = sweep(cfg, lrs=[1e-3, 3e-3], weight_decays=[0.05, 0.3])
    result["best"]["params"], result["best"]["val_accuracy"]

Ray Train v2's way: each Tune trial is a small driver function that builds the TorchTrainer of
layerpar.train.raytrain (the same one launch/train.py runs) with Tune's TuneReportCallback, so every
epoch's report reaches Tune. With parallel.workers = 0 (the `tiny` config) a trial is one process: it
trains in the trial's own Ray worker, which reserves train.threads CPUs (at least one), and reports its
final result to Tune once. The grid is train.lr x train.weight_decay; the best trial is the one with
the highest final validation accuracy. Each trial is an ordinary run directory,
OUT/<sweep>/<trial id>/ (config.yaml, metrics.jsonl, checkpoints/, result.json).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import ray
from ray import tune

from layerpar.config import from_dict
from layerpar.train.loop import run_training

METRIC = "val_accuracy"


def _trial(params: dict) -> None:
    """One Tune trial: a full training run with this trial's hyper-parameters."""
    from ray.tune.integration.ray_train import TuneReportCallback

    cfg = from_dict(params["cfg"]).replace(train={"lr": params["lr"], "weight_decay": params["weight_decay"]})
    run_dir = Path(params["sweep_dir"]) / tune.get_context().get_trial_id()
    if cfg.parallel.workers >= 1:
        run_training(cfg, run_dir, progress=False, callbacks=[TuneReportCallback()])
        return
    result = run_training(cfg, run_dir, progress=False)  # one process: this trial's own worker
    tune.report({k: result[k] for k in (METRIC, "test_accuracy", "steps", "epochs")})


def _trial_resources(cfg) -> dict[str, float]:
    """What one trial reserves: a Ray Train trial only drives (its ranks reserve their CPUs; Tune
    needs a non-empty bundle), a one-process trial trains in its own worker."""
    if cfg.parallel.workers >= 1:
        return {"CPU": 0.01}
    return {"CPU": max(1, cfg.train.threads)}


def sweep(cfg, *, lrs: list[float], weight_decays: list[float], concurrent: int = 1,
          name: str | None = None) -> dict[str, Any]:
    """Run the grid; returns {"sweep_dir", "best", "trials"} (one entry per trial)."""
    from layerpar.parallel.cluster import connect

    name = name or f"{time.strftime('%Y%m%d-%H%M%S')}-tune-{cfg.data.name}"
    sweep_dir = (Path(cfg.train.out_dir) / name).resolve()
    sweep_dir.mkdir(parents=True, exist_ok=True)
    if cfg.parallel.workers >= 1:
        trial_cpus = cfg.parallel.workers * cfg.parallel.replicas * cfg.parallel.cpus_per_worker
    else:
        trial_cpus = _trial_resources(cfg)["CPU"]
    owns_ray = connect(cfg, min_cpus=int(concurrent * trial_cpus))
    try:
        tuner = tune.Tuner(
            tune.with_resources(_trial, _trial_resources(cfg)),
            param_space={"cfg": cfg.to_dict(), "sweep_dir": str(sweep_dir),
                         "lr": tune.grid_search(list(lrs)),
                         "weight_decay": tune.grid_search(list(weight_decays))},
            tune_config=tune.TuneConfig(metric=METRIC, mode="max", max_concurrent_trials=concurrent),
            run_config=tune.RunConfig(name="tune", storage_path=str(sweep_dir)),
        )
        grid = tuner.fit()
        trials = [trial_row(r, sweep_dir) for r in grid]
        done = [t for t in trials if t.get(METRIC) is not None]
        best = max(done, key=lambda t: t[METRIC]) if done else None
        return {"sweep_dir": str(sweep_dir), "metric": METRIC, "best": best, "trials": trials}
    finally:
        if owns_ray and ray.is_initialized():
            ray.shutdown()


def trial_row(r: tune.Result, sweep_dir: Path) -> dict[str, Any]:
    """One trial's line of the sweep's result; a trial that reported nothing has metrics None."""
    params = _params(r.config or _params_file(r.path))
    if r.error is not None:
        return {"params": params, "error": str(r.error).splitlines()[0]}
    m = r.metrics or {}
    return {"params": params, METRIC: m.get(METRIC), "test_accuracy": m.get("test_accuracy"),
            "steps": m.get("steps"),
            "run_dir": str(sweep_dir / m["trial_id"]) if m.get("trial_id") else None}


def _params_file(trial_path: str) -> dict:
    """The trial's parameters as Tune wrote them when it started (params.json), or {}."""
    try:
        return json.loads((Path(trial_path) / "params.json").read_text())
    except (OSError, ValueError):
        return {}


def _params(config: dict) -> dict:
    return {"train.lr": config.get("lr"), "train.weight_decay": config.get("weight_decay")}
