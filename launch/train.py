"""Train a Para-Former (or the serial ViT baseline) and print the result as one JSON line.

    python launch/train.py                                          # packaged config "digits", 2 Ray workers
    python launch/train.py --config launch/configs/digits.yaml --set parallel.workers=0   # one process
    python launch/train.py --config digits_vit                      # the serial baseline, same blocks
    python launch/train.py --config digits --set train.mode=progressive   # every prefix a classifier
    python launch/train.py --config fashion_mnist                   # >= 0.90 within 15 min on 2 cores
    python launch/train.py --config tiny --out-dir /tmp/runs        # seconds, synthetic data
    python launch/train.py --config digits --run-dir runs/my-run    # resumes if it holds a checkpoint
    python launch/train.py --config digits --resume runs/my-run/checkpoints/step_0000420
    python launch/train.py --config digits --address auto           # an existing Ray cluster

Each run writes RUN_DIR/config.yaml (the resolved config), metrics.jsonl (one line per epoch),
checkpoints/step_NNNNNNN/ and result.json. Progress goes to stderr; the last line of stdout is one JSON
object: run_dir, test_accuracy, val_accuracy, prefix_accuracy (k = 1..N), train_seconds, params,
workers, transport, epochs, steps. A bad config, a missing dataset or a bad checkpoint prints one line
on stderr and exits with 2. Same as `layerpar train ...`.
"""

import os
import sys

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # Ray stays on loopback (NOTES.md)
os.environ.setdefault("RAY_AUTH_MODE", "token")

from layerpar.train.loop import cli_main  # noqa: E402

main = cli_main

if __name__ == "__main__":
    sys.exit(cli_main(sys.argv[1:]))
