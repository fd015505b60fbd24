"""A Ray Tune sweep of train.lr x train.weight_decay over the Ray Train run launch/train.py makes.

    python launch/tune.py --config digits --lr 5e-4,1e-3,2e-3 --weight-decay 0.05,0.3
    python launch/tune.py --config tiny --lr 1e-3,3e-3 --weight-decay 0.05    # one-process trials
    python launch/tune.py --config tiny --set parallel.workers=2 --lr 1e-3,3e-3   # Ray Train trials
    python launch/tune.py --config fashion_mnist --concurrent 1 --address auto   # an existing cluster

Every trial is a TorchTrainer of parallel.workers ranks (Ray Train v2 inside a Tune trial, reporting
each epoch to Tune) -- or, with parallel.workers = 0 as in `tiny`, one process in the trial's own Ray
worker (reporting its final result) -- and an ordinary run directory OUT/<sweep>/<trial id>/.
Progress goes to stderr; the last stdout line is one JSON object: sweep_dir, metric (val_accuracy),
best (params, val_accuracy, test_accuracy), trials. A bad config prints one line on stderr and exits with 2.
"""

import argparse
import json
import os
import sys

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # Ray stays on loopback
os.environ.setdefault("RAY_AUTH_MODE", "token")


def _floats(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError("expected at least one number")
    return values


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="launch/tune.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="digits", help="YAML path or packaged config name (default digits)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override one config field (repeatable), e.g. train.epochs=5")
    ap.add_argument("--lr", type=_floats, default=[1e-3, 3e-3], help="train.lr values, comma-separated")
    ap.add_argument("--weight-decay", type=_floats, default=[0.05], help="train.weight_decay values")
    ap.add_argument("--concurrent", type=int, default=1, help="trials run at once (default 1)")
    ap.add_argument("--out-dir", default=None, help="parent of the sweep directory (train.out_dir)")
    ap.add_argument("--address", default=None, help="Ray cluster address (parallel.address), e.g. auto")
    args = ap.parse_args(argv)

    from layerpar.config import ConfigError, load_config
    from layerpar.data import DataError
    from layerpar.train.tune import sweep

    try:
        cfg = load_config(args.config, args.overrides)
        if args.out_dir is not None:
            cfg = cfg.replace(train={"out_dir": args.out_dir})
        if args.address is not None:
            cfg = cfg.replace(parallel={"address": args.address})
        result = sweep(cfg, lrs=args.lr, weight_decays=args.weight_decay, concurrent=args.concurrent)
    except (ConfigError, DataError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
