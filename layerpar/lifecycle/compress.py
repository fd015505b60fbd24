"""Compression: keep the first k branches. The sum of branches 0..k-1 is itself a model (the prefix
model), so a checkpoint with the embedding, those branches and the head serves exactly the prefix
model's logits at k/N of the branch cost.

    layerpar compress runs/digits --branches 4 --out runs/digits-k4
    report = compress("runs/digits", branches=4, out="runs/digits-k4")

Only the kept pieces are read from the source; the new checkpoint carries no optimizer state.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

from safetensors import safe_open

from layerpar.config import from_dict
from layerpar.data import load_dataset
from layerpar.lifecycle.common import (
    LifecycleError,
    apply_overrides,
    dir_bytes,
    evaluate_checkpoint,
    new_run_dir,
    num_params,
    write_run,
)
from layerpar.train.checkpoint import load_checkpoint, model_state, read_manifest, resolve_checkpoint


def compress(run_dir: str | Path, *, branches: int, out: str | Path, evaluate: bool = True,
             overrides: list[str] | None = None) -> dict[str, Any]:
    """Write RUN_DIR `out` holding the prefix model of the first `branches` branches of `run_dir`
    (a run directory or a checkpoint). With `evaluate`, measure the accuracy it keeps on the test
    split of the config's dataset (overrides such as data.root=... apply). Returns a report dict."""
    source = resolve_checkpoint(run_dir)
    cfg = from_dict(read_manifest(source)["config"])
    n = cfg.model.num_branches
    if cfg.model.kind != "paraformer":
        raise LifecycleError(f"{source}: a {cfg.model.kind} has no branches to drop")
    if not 1 <= branches <= n:
        raise LifecycleError(f"--branches ({branches}) must be in 1..{n}, the source's branch count")
    pieces = ["embed", "head"] + [f"branch.{b}" for b in range(branches)]
    ckpt = load_checkpoint(source, pieces, with_optim=False)  # the dropped branches are never read
    state = model_state(ckpt)
    new_cfg = apply_overrides(cfg, overrides).replace(
        model={"num_branches": branches},
        parallel={"workers": min(cfg.parallel.workers, branches)},
        train={"frozen_branches": min(cfg.train.frozen_branches, branches - 1)},
    )
    splits = load_dataset(new_cfg) if evaluate else None  # data errors before anything is written
    out_dir = new_run_dir(out)
    path = write_run(out_dir, state, new_cfg, step=ckpt.step, epoch=ckpt.epoch,
                     extra={"compressed_from": str(source), "source_branches": n})
    source_bytes = sum((source / f).stat().st_size for f in ckpt.manifest["pieces"].values())
    report: dict[str, Any] = {
        "command": "compress", "source": str(source), "run_dir": str(out_dir), "checkpoint": str(path),
        "branches": branches, "source_branches": n,
        "params": num_params(state), "source_params": _source_params(source),
        "bytes": dir_bytes(path), "source_weight_bytes": source_bytes,
    }
    if evaluate:
        mine = evaluate_checkpoint(path, new_cfg, splits=splits)
        full = evaluate_checkpoint(source, cfg.replace(data=vars(new_cfg.data)), splits=splits)
        report.update({
            "dataset": mine["dataset"], "split": mine["split"], "samples": mine["samples"],
            "accuracy": mine["accuracy"], "source_accuracy": full["accuracy"],
            "accuracy_kept": mine["accuracy"] / full["accuracy"] if full["accuracy"] else None,
            "source_prefix_accuracy": full["prefix_accuracy"],
        })
    return report


def _source_params(source: Path) -> int:
    """Parameters of the whole source model, from the tensor headers of its files (no full read)."""
    total = 0
    for name in read_manifest(source)["pieces"].values():
        with safe_open(source / name, framework="pt") as f:
            total += sum(math.prod(f.get_slice(key).get_shape()) for key in f.keys())
    return total


def cli_main(argv: list[str] | None = None) -> int:
    """layerpar compress RUN_DIR --branches K --out RUN_DIR_K [--no-eval] [--set data.root=...]"""
    ap = argparse.ArgumentParser(
        prog="layerpar compress",
        description="Keep the embedding, the first K branches and the head of a Para-Former run: the "
                    "prefix model, as a new run directory. Reports parameters, size on disk and the "
                    "test accuracy kept.")
    ap.add_argument("run_dir", help="source run directory (its latest checkpoint) or checkpoint")
    ap.add_argument("--branches", type=int, required=True, help="branches to keep (1..N)")
    ap.add_argument("--out", required=True, help="new run directory to create")
    ap.add_argument("--no-eval", action="store_true", help="skip measuring accuracy")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override of a non-model config field, e.g. data.root=/data (repeatable)")
    args = ap.parse_args(argv)
    report = compress(args.run_dir, branches=args.branches, out=args.out, evaluate=not args.no_eval,
                      overrides=args.overrides)
    print(json.dumps(report))
    return 0
