"""The language model's quality study: at equal parameters and equal training time on the default
corpus (the stdlib), the validation bits per byte of the Para-Former LM (joint and progressive)
beside the serial GPT of the same blocks. launch/bench_lm.py is its command line.

    rows = study(budget_s=120, widths=[128], shapes=[(4, 1), (2, 2)])   # one row per run
    print(table(rows)); summary(rows)["worst_ratio"]

Equal parameters: a Para-Former LM of N branches x depth d and the serial GPT of N*d blocks are
built of the same blocks, embedding and tied head: the same parameter count by construction (the
table says it). Equal training time: each run gets `budget_s` seconds of training. Its throughput
(batches per second of train_step, progressive counting its N + 1 optimizer steps per batch) is
measured on a few steps first, the run is sized to budget_s x that rate batches (one pass, the cosine
schedule ending there), and train.max_minutes guards the budget if the machine slows down. Every run
is the training loop's own (run_training, one process), so its numbers are those of the epoch
record: validation bits per byte over data.eval_windows evenly spaced windows of the val files.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import torch

from layerpar.config import load_config
from layerpar.train.lm_shard import LMShard
from layerpar.train.loop import run_training

VARIANTS = (("serial_lm", "joint"), ("paraformer_lm", "joint"), ("paraformer_lm", "progressive"))


def base_sets(*, width: int, context: int, batch: int, eval_windows: int, threads: int,
              root: str | None) -> list[str]:
    heads = max(1, width // 32)
    return ["model.kind=paraformer_lm", "data.name=text", f"model.context={context}", f"model.dim={width}",
            f"model.heads={heads}", f"model.mlp_dim={2 * width}", f"train.batch_size={batch}",
            f"data.eval_windows={eval_windows}", f"train.threads={threads}", "train.epochs=1",
            "train.checkpoint_every=1", "train.keep_checkpoints=1", "train.warmup_fraction=0.05",
            "train.lr=2e-3", "train.min_lr=1e-4", *([f"data.root={root}"] if root else [])]


def rate(cfg, steps: int = 5) -> float:
    """Batches per second of this config's train_step (one warm-up batch, then the median of
    `steps`), on random windows: the time does not depend on the tokens."""
    torch.set_num_threads(max(1, cfg.train.threads))
    shard = LMShard(cfg, worker_rank=0, total_steps=10 * steps)
    g = torch.Generator().manual_seed(0)
    times = []
    for i in range(steps + 1):
        w = torch.randint(0, 259, (cfg.train.batch_size, cfg.model.context + 1), generator=g)
        t0 = time.perf_counter()
        shard.train_step(w[:, :-1], w[:, 1:])
        if i:
            times.append(time.perf_counter() - t0)
    return 1.0 / statistics.median(times)


def run_one(sets: list[str], kind: str, mode: str, num_branches: int, depth: int, budget_s: float,
            out_dir: Path) -> dict:
    cfg = load_config(None, [*sets, f"model.kind={kind}", f"train.mode={mode}",
                             f"model.num_branches={num_branches}", f"model.branch_depth={depth}"])
    per_s = rate(cfg)
    batches = max(2, int(budget_s * per_s))
    cfg = cfg.replace(data={"limit_train": batches * cfg.train.batch_size},
                      train={"max_minutes": 1.5 * budget_s / 60, "out_dir": str(out_dir)})
    result = run_training(cfg, progress=False)
    per_batch = num_branches + 1 if mode == "progressive" else 1  # optimizer steps per batch
    return {"kind": kind, "mode": mode, "num_branches": num_branches, "branch_depth": depth,
            "serial_depth": num_branches * depth, "width": cfg.model.dim, "params": result["params"],
            "batches_per_s": round(per_s, 3), "steps": result["steps"],
            "stopped_early": result["stopped_early"], "train_s": result["train_seconds"],
            "tokens": result["steps"] // per_batch * cfg.train.batch_size * cfg.model.context,
            "val_bpb": result["val_bits_per_byte"], "val_prefix_bpb": result["val_prefix_bits_per_byte"],
            "test_bpb": result["test_bits_per_byte"], "val_next_byte_accuracy": result["val_accuracy"]}


def study(*, budget_s: float, widths: list[int], shapes: list[tuple[int, int]], context: int = 128,
          batch: int = 16, eval_windows: int = 128, threads: int = 2, root: str | None = None,
          out_dir: str | None = None, say=print) -> list[dict]:
    """Every (width, shape) with the three variants; the serial GPT of a depth is run once per width."""
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="layerpar-bench-lm-") as tmp:
        where = Path(out_dir or tmp)
        for width in widths:
            sets = base_sets(width=width, context=context, batch=batch, eval_windows=eval_windows,
                             threads=threads, root=root)
            serial_done: dict[int, dict] = {}
            for n, d in shapes:
                for kind, mode in VARIANTS:
                    if kind == "serial_lm" and n * d in serial_done:
                        continue
                    row = run_one(sets, kind, mode, n, d, budget_s, where)
                    if kind == "serial_lm":
                        serial_done[n * d] = row
                    row["ratio_to_serial"] = round(row["val_bpb"] / serial_done[n * d]["val_bpb"], 4)
                    rows.append(row)
                    say(f"  {kind:13s} {mode:11s} N={n} depth={d} width={width}: val {row['val_bpb']:.3f} "
                        f"bits/byte in {row['train_s']:.0f} s ({row['steps']} steps)")
    return rows


def table(rows: list[dict]) -> str:
    head = (f"{'model':13s} {'mode':11s} {'N':>2s} {'depth':>5s} {'width':>5s} {'params':>8s} {'steps':>6s} "
            f"{'train s':>7s} {'tokens':>8s} {'val bpb':>8s} {'/serial':>7s}  prefixes (val bpb)")
    lines = [head, "-" * len(head)]
    for r in rows:
        para = r["kind"] == "paraformer_lm"
        n, d = (r["num_branches"], r["branch_depth"]) if para else (1, r["serial_depth"])
        prefixes = " ".join(f"{v:.3f}" for v in r["val_prefix_bpb"]) if para else ""
        stopped = "*" if r["stopped_early"] else " "
        lines.append(f"{r['kind']:13s} {r['mode']:11s} {n:>2d} {d:>5d} {r['width']:>5d} {r['params']:>8d} "
                     f"{r['steps']:>5d}{stopped} {r['train_s']:>7.1f} {r['tokens']:>8d} {r['val_bpb']:>8.3f} "
                     f"{r['ratio_to_serial']:>7.3f}  {prefixes}")
    if any(r["stopped_early"] for r in rows):
        lines.append("* stopped by train.max_minutes (1.5 x the budget) before its sized schedule ended: the "
                     "machine ran slower than measured; that comparison is not at equal compute")
    return "\n".join(lines)


def summary(rows: list[dict], target: float = 1.10) -> dict:
    """The best and worst Para-Former / serial ratio of validation bits per byte, by mode."""
    out: dict = {}
    for mode in ("joint", "progressive"):
        ratios = [r["ratio_to_serial"] for r in rows if r["kind"] == "paraformer_lm" and r["mode"] == mode]
        if ratios:
            out[f"{mode}_best_ratio"], out[f"{mode}_worst_ratio"] = min(ratios), max(ratios)
    best = [v for k, v in out.items() if k.endswith("best_ratio")]
    out["best_ratio"] = min(best) if best else None
    out["within_target"] = out["best_ratio"] is not None and out["best_ratio"] <= target
    out["target_ratio"] = target
    return out
