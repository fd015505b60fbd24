"""Mixed precision and torch.compile, measured in one process: the training step time of float32 vs
bfloat16 (train.precision) and of model.compile off vs on, on the digits and fashion_mnist model
shapes (synthetic batches of each config's batch size: step time does not depend on the pixels), and
with --accuracy-epochs the digits test accuracy of a bfloat16 run vs a float32 run of the same seed.

    python launch/bench_precision.py                          # step times, CPU (minutes: compiling)
    python launch/bench_precision.py --accuracy-epochs 10     # + digits accuracy, bf16 vs float32
    python launch/bench_precision.py --device cuda            # on a GPU (adds float16)
    python launch/bench_precision.py --configs digits --steps 10 --no-compile   # quick

The step is the training loop's own (BranchShard.train_step on a world of one: the step every rank
runs); the variants' steps are timed interleaved, so a shared machine's load falls on all alike.
The last stdout line is one JSON object: per config {float32_step_ms, bfloat16_step_ms,
bf16_over_fp32_step_time, compile_s (the first compiled steps' time beyond eager's), compiled_step_ms,
compiled_over_eager_step_time}, and with --accuracy-epochs digits_accuracy {float32, bfloat16, diff}.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

import torch  # noqa: E402

from layerpar.config import load_config  # noqa: E402
from layerpar.train.shard import BranchShard  # noqa: E402


class Variant:
    """One process's training step of one config variant, on a fixed synthetic batch."""

    def __init__(self, cfg, device: str) -> None:
        torch.manual_seed(0)
        self.shard, self.device = BranchShard(cfg, worker_rank=0, total_steps=10 ** 6), device
        m, b = cfg.model, cfg.train.batch_size
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(b, m.in_channels, m.image_size, m.image_size, generator=g)
        self.y = torch.randint(0, m.num_classes, (b,), generator=g)
        self.times: list[float] = []

    def step(self) -> float:
        t = time.perf_counter()
        self.shard.train_step(self.x, self.y)
        if self.device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t


def bench_config(name: str, args) -> dict:
    """Step times of every variant, measured interleaved (one step of each in turn): on a machine
    shared with other jobs the load then falls on every variant alike, and the ratios hold."""
    base = [f"train.threads={args.threads}", "parallel.workers=0"]
    if args.device == "cuda":
        base.append("parallel.gpus_per_worker=1")
    torch.set_num_threads(args.threads)
    sets = {p: [f"train.precision={p}"] for p in ["float32", "bfloat16"]
            + (["float16"] if args.device == "cuda" else [])}
    if args.compile:
        sets["compiled"] = ["model.compile=true"]
    variants, warm = {}, {}
    for key, extra in sets.items():
        variants[key] = v = Variant(load_config(name, base + extra), args.device)
        warm[key] = sum(v.step() for _ in range(args.warmup))  # compiling happens here
    for _ in range(args.steps):
        for v in variants.values():
            v.times.append(v.step())
    out: dict = {f"{k}_step_ms": 1e3 * statistics.median(v.times) for k, v in variants.items()}
    for k in variants:
        print(f"{name} {k}: {out[f'{k}_step_ms']:.2f} ms/step", file=sys.stderr)
    out["bf16_over_fp32_step_time"] = out["bfloat16_step_ms"] / out["float32_step_ms"]
    if args.compile:
        # the first steps' time beyond eager's: what compiling cost
        out["compile_s"] = max(0.0, warm["compiled"] - warm["float32"])
        out["compiled_over_eager_step_time"] = out["compiled_step_ms"] / out["float32_step_ms"]
    m = load_config(name).model
    out["shape"] = f"{m.num_branches}x{m.branch_depth} blocks, dim {m.dim}, {m.image_size}px"
    return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in out.items()}


def digits_accuracy(epochs: int, threads: int) -> dict:
    from layerpar.train.loop import run_training

    acc = {}
    for p in ("float32", "bfloat16"):
        cfg = load_config("digits", [f"train.epochs={epochs}", f"train.threads={threads}",
                                     "parallel.workers=0", f"train.precision={p}"])
        with tempfile.TemporaryDirectory() as d:
            acc[p] = run_training(cfg, os.path.join(d, "run"), progress=False)["test_accuracy"]
        print(f"digits {epochs} epochs {p}: test accuracy {acc[p]:.4f}", file=sys.stderr)
    return {**acc, "epochs": epochs, "diff": round(acc["bfloat16"] - acc["float32"], 4)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", nargs="+", default=["digits", "fashion_mnist"],
                    help="packaged configs whose model shape is measured (default digits fashion_mnist)")
    ap.add_argument("--steps", type=int, default=20, help="timed steps per variant (default 20)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed first steps (compiling, default 3)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--no-compile", dest="compile", action="store_false", help="skip model.compile")
    ap.add_argument("--accuracy-epochs", type=int, default=0,
                    help="also train digits this many epochs in float32 and bfloat16 (0: skip)")
    args = ap.parse_args(argv)
    result = {"device": args.device if args.device == "cpu" else torch.cuda.get_device_name(),
              "threads": args.threads, "torch": torch.__version__}
    for name in args.configs:
        result[name] = bench_config(name, args)
    if args.accuracy_epochs:
        result["digits_accuracy"] = digits_accuracy(args.accuracy_epochs, args.threads)
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
