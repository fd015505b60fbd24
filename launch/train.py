"""Train a Para-Former (or the serial ViT baseline) and print the result as one JSON line.

    python launch/train.py                                          # packaged config "digits", 2 Ray workers
    python launch/train.py --config launch/configs/digits.yaml --set parallel.workers=0   # one process
    python launch/train.py --config digits_vit                      # the serial baseline, same blocks
    python launch/train.py --config digits --set train.mode=progressive   # every prefix a classifier
    python launch/train.py --config digits --set train.precision=bfloat16 # mixed precision (autocast)
    python launch/train.py --config fashion_mnist                   # >= 0.90 within 15 min on 2 cores
    python launch/train.py --config tiny --out-dir /tmp/runs        # seconds, synthetic data
    python launch/train.py --config digits --run-dir runs/my-run    # resumes if it holds a checkpoint
    python launch/train.py --config digits --resume runs/my-run/checkpoints/step_0000420
    python launch/train.py --config digits --address auto           # an existing Ray cluster
    python launch/train.py --config digits --set train.storage=s3://bucket/runs   # checkpoints there
    python launch/train.py --config digits --set train.storage=s3://bucket/runs \
        --resume s3://bucket/runs/my-run/checkpoints/step_0000420           # resume from storage
    python launch/train.py --config tiny --set data.name=folder --set data.root=my_images \
        --set model.num_classes=3 --set parallel.workers=2          # your own images (train/<class>/)
    python launch/train.py --config fashion_mnist --set data.name=folder --set data.root=runs/fmnist \
        --set data.streaming=true       # read by Ray Data as it trains, not loaded (docs/TRAINING.md)

With parallel.workers >= 1 the run is a Ray Train job (ray.train.torch.TorchTrainer, Ray Train v2):
every rank runs the whole loop on its share of the branches; parallel.* sets the ScalingConfig,
train.max_failures the FailureConfig (a lost worker restarts the group from the latest checkpoint) and
train.storage (default: the run directory's parent; a path or s3:// / gs:// URI) the RunConfig.
parallel.workers=0 runs the same loop in this process as a world of one, without Ray (with
data.streaming=true it starts a local Ray for Ray Data). A streamed dataset is checked before anything
is written -- it exists, its classes, its size, the images of its normalisation sample -- and a bad
one (an unreadable image, an empty class folder, a Parquet file without the label column, fewer
images than a batch for the replicas) is one line on stderr and exit 2.

Each run writes RUN_DIR/config.yaml (the resolved config), metrics.jsonl (one line per epoch),
checkpoints/step_NNNNNNN/ (under train.storage when set) and result.json. Progress goes to stderr (a
bar with epoch, loss and samples/s); the last line of stdout is one JSON object: run_dir,
test_accuracy, val_accuracy, prefix_accuracy (k = 1..N), train_seconds, total_seconds, params,
workers, transport, epochs, steps, checkpoint, failures, restarts, trainer, storage, started_from (the
checkpoint the ranks restored first), phases (per rank: step, compute, collectives and data ms per
step). The run starts from the checkpoint it announces (docs/TRAINING.md, "Where a run starts"); Ray's
own output goes to its logs, named in RUN_DIR/ray.log. A bad config, a missing dataset or a bad
checkpoint (verified before Ray starts) prints one line on stderr and exits with 2; a run Ray Train
gives up on, one line and 1.
Same as `layerpar train ...`.
"""

import os
import sys

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # Ray stays on loopback (docs/CLUSTER.md)
os.environ.setdefault("RAY_AUTH_MODE", "token")
# Ray's own output (actors' and ranks' stdout, Ray Train's reports) goes to Ray's session logs, not over
# the progress bar; RUN_DIR/ray.log says where they are (set RAY_LOG_TO_DRIVER=1 to see them here)
os.environ.setdefault("RAY_LOG_TO_DRIVER", "0")

from layerpar.train.loop import cli_main  # noqa: E402

main = cli_main

if __name__ == "__main__":
    sys.exit(cli_main(sys.argv[1:]))
