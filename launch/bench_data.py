"""Streaming vs in-memory training data on Fashion-MNIST written as an image folder (70 k PNGs) and
at 10x (600 k): peak memory per rank at 10x over 1x (streaming), training samples/s of streaming over
the in-memory path at 1x, and the test accuracy of both after the same steps (same seeds).

    python launch/bench_data.py                         # the full benchmark (minutes; folders cached)
    python launch/bench_data.py --quick                 # a smoke test: 600 images, a tiny model
    python launch/bench_data.py --work-dir /data/bench  # where the image folders are cached

Every run is `launch/train.py` in one process (a world of one: the loop every Ray Train rank runs),
sampled from outside (layerpar/bench/data_bench.py says what is counted). Prints a table, then one
JSON line with peak_rss_ratio_10x_over_1x, streaming_over_memory_samples_per_s, the accuracies, what
was measured and the load average. Run it on a quiet machine: the figures are timings.
"""

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_AUTH_MODE", "token")


def main(argv: list[str] | None = None) -> int:
    from layerpar.bench.data_bench import DEFAULT_WORK_DIR, run, table

    ap = argparse.ArgumentParser(prog="python launch/bench_data.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work-dir", default=DEFAULT_WORK_DIR,
                    help=f"where the image folders are written once and reused (default {DEFAULT_WORK_DIR})")
    ap.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test of the benchmark")
    ap.add_argument("--steps", type=int, default=0,
                    help="training steps of every run (default 0: one epoch of the 1x training split)")
    ap.add_argument("--config", default="fashion_mnist", help="the model and training config (default "
                    "fashion_mnist)")
    ap.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                    help="override a config field of every run (repeatable)")
    args = ap.parse_args(argv)
    if args.steps < 0:
        print("error: --steps must be >= 0", file=sys.stderr)
        return 2
    work = Path(args.work_dir).expanduser()
    try:
        summary = run(work=work, quick=args.quick, steps=args.steps, config=args.config, sets=args.sets,
                      say=lambda msg: print(msg, file=sys.stderr, flush=True))
    except RuntimeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(table(summary))
    print(json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
