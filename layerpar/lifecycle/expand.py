"""Expansion: append m freshly initialised branches to a trained Para-Former and train only them.

    layerpar expand runs/digits --add 2 --out runs/digits-plus2 --set train.epochs=5
    report = expand("runs/digits", add=2, out="runs/digits-plus2", overrides=["train.epochs=5"])

The new branches get their seeded initialisation (branch b from (train.seed, b), as everywhere). With
train.frozen_branches = N the embedding, the head and the N old branches are frozen (no gradient, no
optimizer state, no weight decay) and progressive training runs over the new prefixes N+1..N+m only,
so every earlier prefix model keeps its logits bit for bit. `unfreeze` trains everything instead.
Training is the ordinary loop (run_training) on the dataset in the config, after the overrides.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch

from layerpar.config import from_dict
from layerpar.data import load_dataset
from layerpar.lifecycle.common import (
    LifecycleError,
    apply_overrides,
    evaluate_checkpoint,
    new_run_dir,
    write_run,
)
from layerpar.model import ParaFormer
from layerpar.train.checkpoint import load_checkpoint, model_state, resolve_checkpoint


def expanded_config(cfg, add: int, *, unfreeze: bool = False, overrides: list[str] | None = None):
    """The config of the grown model: N + add branches, progressive training of the new ones only
    (unless unfreeze), then the user's overrides (data.*, train.* ...)."""
    n = cfg.model.num_branches
    frozen = 0 if unfreeze else n
    grown = cfg.replace(model={"num_branches": n + add},
                        train={"mode": "progressive", "frozen_branches": frozen})
    return apply_overrides(grown, overrides)


def grown_state(state: dict[str, torch.Tensor], cfg, new_cfg) -> dict[str, torch.Tensor]:
    """The source weights plus freshly initialised branches N..N+m-1 (seeded by train.seed)."""
    n, total = cfg.model.num_branches, new_cfg.model.num_branches
    fresh = ParaFormer(new_cfg.model, seed=new_cfg.train.seed, branch_ids=range(n, total))
    out = dict(state)
    for b in range(n, total):
        out.update({k: v.detach().clone() for k, v in fresh.piece_state(f"branch.{b}").items()})
    return out


def expand(run_dir: str | Path, *, add: int, out: str | Path | None = None, unfreeze: bool = False,
           overrides: list[str] | None = None, evaluate: bool = True,
           progress: bool = True) -> dict[str, Any]:
    """Grow `run_dir` (a run or checkpoint) by `add` branches, train them, write RUN_DIR `out`.
    Returns a report: accuracies before and after, every prefix's accuracy, and whether the frozen
    weights came out bit-identical."""
    from layerpar.train.loop import run_training

    source = resolve_checkpoint(run_dir)
    ckpt = load_checkpoint(source, with_optim=False)
    cfg = from_dict(ckpt.manifest["config"])
    if cfg.model.kind != "paraformer":
        raise LifecycleError(f"{source}: a {cfg.model.kind} has no branches to add to")
    if add < 1:
        raise LifecycleError(f"--add ({add}) must be >= 1")
    n = cfg.model.num_branches
    new_cfg = expanded_config(cfg, add, unfreeze=unfreeze, overrides=overrides)
    if out is None:
        run = source.parent.parent if source.parent.name == "checkpoints" else source
        out = run.with_name(f"{run.name}-b{n + add}")
    splits = load_dataset(new_cfg)  # a data error surfaces before anything is written
    before = None
    if evaluate:  # the source model on the same data the grown one is tested on
        before = evaluate_checkpoint(source, cfg.replace(data=vars(new_cfg.data)), splits=splits)
    out_dir = new_run_dir(out)
    state = model_state(ckpt)
    # the starting point is a fresh run: step 0, epoch 0, no optimizer state; run_training resumes it
    write_run(out_dir, grown_state(state, cfg, new_cfg), new_cfg,
              extra={"expanded_from": str(source), "source_branches": n, "source_step": ckpt.step})
    result = run_training(new_cfg, run_dir=out_dir, progress=progress)

    final = model_state(load_checkpoint(result["checkpoint"], with_optim=False))
    unchanged = all(torch.equal(final[k], v) for k, v in state.items())
    report: dict[str, Any] = {
        "command": "expand", "source": str(source), "run_dir": str(out_dir),
        "checkpoint": result["checkpoint"], "source_branches": n, "branches": n + add,
        "frozen_branches": new_cfg.train.frozen_branches, "old_weights_unchanged": unchanged,
        "dataset": new_cfg.data.name, "epochs": result["epochs"], "steps": result["steps"],
        "train_seconds": result["train_seconds"], "params": result["params"],
        "accuracy": result["test_accuracy"], "prefix_accuracy": result["prefix_accuracy"],
    }
    if before is not None:
        report.update(source_accuracy=before["accuracy"],
                      source_prefix_accuracy=before["prefix_accuracy"])
    return report


def cli_main(argv: list[str] | None = None) -> int:
    """layerpar expand RUN_DIR --add M [--out RUN_DIR_M] [--unfreeze] [--set data.name=...]"""
    ap = argparse.ArgumentParser(
        prog="layerpar expand",
        description="Append M freshly initialised branches to a trained Para-Former and train only "
                    "them (progressive over the new prefixes; embedding, head and old branches "
                    "frozen, so every earlier prefix model is unchanged bit for bit).")
    ap.add_argument("run_dir", help="source run directory (its latest checkpoint) or checkpoint")
    ap.add_argument("--add", type=int, required=True, help="branches to append")
    ap.add_argument("--out", default=None, help="new run directory (default: RUN_DIR-b<N+M> beside it)")
    ap.add_argument("--unfreeze", action="store_true",
                    help="train the old branches, embedding and head too (earlier prefixes change)")
    ap.add_argument("--epochs", type=int, default=None, help="epochs (default: the source's)")
    ap.add_argument("--no-eval", action="store_true", help="skip evaluating the source model")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override, e.g. data.name=fashion_mnist train.lr=1e-3 (repeatable)")
    args = ap.parse_args(argv)
    overrides = args.overrides + ([f"train.epochs={args.epochs}"] if args.epochs else [])
    report = expand(args.run_dir, add=args.add, out=args.out, unfreeze=args.unfreeze,
                    overrides=overrides, evaluate=not args.no_eval)
    print(json.dumps(report))
    return 0
