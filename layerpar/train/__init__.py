"""Training: the shared step, the optimizer, checkpoints, evaluation, the single-process loop, and
for parallel.workers >= 1 the Ray Train job (raytrain.py: the driver; spmd.py: the loop every rank
runs; shard_checkpoint.py: checkpoints written by every rank; tune.py: a Ray Tune sweep over it).

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
