"""Training: the shared step, the optimizer, checkpoints, evaluation, and the one training loop
(rank_loop.py) -- run in this process as a world of one for parallel.workers = 0 (loop.py), and for
parallel.workers >= 1 by every rank of a Ray Train job (raytrain.py: the driver; spmd.py: the rank's
set-up and reports; shard_checkpoint.py: checkpoints written by every rank; tune.py: a Ray Tune sweep).

    from layerpar.train import run_training
    result = run_training(load_config("digits", ["parallel.workers=0"]))
"""

from layerpar.train.checkpoint import (
    Checkpoint,
    CheckpointError,
    latest_checkpoint,
    load_checkpoint,
    model_state,
    save_checkpoint,
)
from layerpar.train.evaluate import evaluate
from layerpar.train.local import LocalBackend
from layerpar.train.loop import run_training

__all__ = [
    "Checkpoint", "CheckpointError", "LocalBackend", "evaluate", "latest_checkpoint", "load_checkpoint",
    "model_state", "run_training", "save_checkpoint",
]
