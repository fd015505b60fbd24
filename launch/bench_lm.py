"""The language model's quality study: validation bits per byte of the Para-Former LM (joint and
progressive) beside the serial GPT of the same blocks, at equal parameters and equal training time,
on the default corpus (the Python standard library's .py files; no download).

    python launch/bench_lm.py                                     # the study: widths 128, N x depth 4x1, 2x2
    python launch/bench_lm.py --budget-s 300 --widths 96,128 --shapes 4x1,2x2,8x1
    python launch/bench_lm.py --quick                             # a smoke test: seconds per run, tiny

Each (width, N x depth) trains three runs through the training loop in this process: the serial GPT
of N*depth blocks (run once per depth and width), the Para-Former LM joint and progressive; each run
gets --budget-s seconds of training (sized from its measured throughput, guarded by
train.max_minutes; layerpar/bench/lm_quality.py). The machine should be otherwise idle: equal time
means equal compute only then. Prints a table (branch depth and width of every run, validation bits
per byte of the full model and of every prefix, its ratio to the serial GPT's); the last stdout line
is one JSON object: {"study": "lm_quality", "budget_s", "rows": [...], "summary": {"joint_best_ratio",
"progressive_best_ratio", ..., "best_ratio", "within_target" (best ratio <= 1.10)}, "loadavg"}.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def _shapes(text: str) -> list[tuple[int, int]]:
    out = []
    for part in text.split(","):
        n, _, d = part.strip().partition("x")
        out.append((int(n), int(d)))
    return out


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="bench_lm", description="Validation bits per byte of the Para-Former "
                                 "LM (joint, progressive) vs the serial GPT at equal parameters and training "
                                 "time; the last stdout line is one JSON object.")
    ap.add_argument("--budget-s", type=float, default=120.0, help="training seconds per run (default 120)")
    ap.add_argument("--widths", default="128", help="model widths, comma-separated (default 128)")
    ap.add_argument("--shapes", default="4x1,2x2", help="N x branch_depth of the Para-Former, comma-"
                    "separated; the serial GPT has N*depth blocks (default 4x1,2x2)")
    ap.add_argument("--context", type=int, default=128, help="tokens per window (default 128)")
    ap.add_argument("--batch", type=int, default=16, help="windows per batch (default 16)")
    ap.add_argument("--eval-windows", type=int, default=128, help="validation windows (default 128)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    ap.add_argument("--root", default=None, help="corpus directory (default: the stdlib's .py files)")
    ap.add_argument("--out-dir", default=None, help="keep the runs here (default: a temporary directory)")
    ap.add_argument("--quick", action="store_true", help="a smoke test: 3 s per run, width 16, 2x1, "
                    "context 16, the stdlib's json package as the corpus")
    args = ap.parse_args(argv)
    try:
        args.widths, args.shapes = _ints(args.widths), _shapes(args.shapes)
    except ValueError:
        ap.error("--widths takes integers like 96,128 and --shapes pairs like 4x1,2x2")
    if args.quick:
        args.budget_s, args.widths, args.shapes, args.context = 3.0, [16], [(2, 1)], 16
        args.batch, args.eval_windows, args.threads = 4, 8, 1
        if args.root is None:
            import sysconfig

            args.root = str(Path(sysconfig.get_paths()["stdlib"]) / "json")
    if args.budget_s <= 0 or not args.widths or not args.shapes or min(args.widths) < 1 \
            or min(n * d for n, d in args.shapes) < 1:
        ap.error("--budget-s, --widths and --shapes must be positive")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)  # before the heavy imports: a bad argument answers at once
    from layerpar.bench.lm_quality import study, summary, table

    say = (lambda msg: print(msg, file=sys.stderr, flush=True))
    try:
        rows = study(budget_s=args.budget_s, widths=args.widths, shapes=args.shapes, context=args.context,
                     batch=args.batch, eval_windows=args.eval_windows, threads=args.threads, root=args.root,
                     out_dir=args.out_dir, say=say)
    except Exception as exc:  # a bad corpus or config value: one line
        if type(exc).__name__ not in ("ConfigError", "DataError"):
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(table(rows))
    with open("/proc/loadavg") as f:
        load = f.read().split()[:3]
    print(json.dumps({"study": "lm_quality", "budget_s": args.budget_s, "rows": rows,
                      "summary": summary(rows), "loadavg": load}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
