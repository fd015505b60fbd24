"""Evaluation of any Backend: accuracy and loss of the full model and the accuracy of every prefix
model k = 1..N, from one `prefix_logits` pass per batch.

    metrics = evaluate(backend, splits.test, batch_size=256)
    metrics["accuracy"], metrics["prefix_accuracy"][k - 1]
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def evaluate(backend, split, batch_size: int = 256) -> dict:
    """{"accuracy", "loss", "prefix_accuracy": [k = 1..N], "samples"} over a data Split.
    The full model is the last prefix. An empty split gives None values."""
    n = len(split.y)
    if n == 0:
        return {"accuracy": None, "loss": None, "prefix_accuracy": None, "samples": 0}
    correct: torch.Tensor | None = None  # (K,) correct predictions per prefix
    loss_sum = 0.0
    for start in range(0, n, batch_size):  # in order, no shuffle: the same numbers every time
        x, y = split.take(slice(start, start + batch_size))  # resized to the model's side if needed
        logits = backend.prefix_logits(x).float()  # (K, B, classes)
        hits = (logits.argmax(dim=-1) == y.unsqueeze(0)).sum(dim=1)  # (K,)
        correct = hits if correct is None else correct + hits
        loss_sum += F.cross_entropy(logits[-1], y, reduction="sum").item()
    prefix = [c / n for c in correct.tolist()]
    return {"accuracy": prefix[-1], "loss": loss_sum / n, "prefix_accuracy": prefix, "samples": n}


def epoch_record(*, epoch: int, step: int, losses: list[float], val: dict, lr: float, seconds: float,
                 train_seconds: float, done: int, stopped: bool) -> dict:
    """One line of metrics.jsonl: epoch counts as done unless the run stopped mid-epoch (then
    `epoch_batches` says how far it got)."""
    record = {"epoch": epoch + (0 if stopped else 1), "step": step,
              "train_loss": sum(losses) / len(losses) if losses else None,
              "val_accuracy": val["accuracy"], "val_loss": val["loss"],
              "val_prefix_accuracy": val["prefix_accuracy"], "lr": lr,
              "seconds": round(seconds, 3), "train_seconds": round(train_seconds, 3)}
    if stopped:
        record["epoch_batches"] = done
    return record
