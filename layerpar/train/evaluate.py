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
    if hasattr(backend, "evaluate_split"):  # a language model's (train/lm_shard.LMEval): bits per byte
        return backend.evaluate_split(split, batch_size)
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


def evaluate_feed(backend, feed, name: str, batch_size: int, comm) -> dict:
    """evaluate() of split `name` ("val" or "test") as a training feed holds it (train/feed.py): the
    whole split on every rank (MemoryFeed), or each replica's share (StreamingFeed): then every replica
    evaluates its rows and the replicas' counts -- correct predictions per prefix, loss sum, rows -- are
    summed (comm.sum_over_replicas). Accuracies are exact counts, so they equal one process's; the
    loss (float32 per row, summed in float64) differs from it only in the order its float64 terms
    are added."""
    if not feed.shared_eval:
        return evaluate(backend, feed.split(name), batch_size)
    correct: torch.Tensor | None = None
    loss_sum, n = 0.0, 0
    for x, y in feed.eval_batches(name, batch_size):
        logits = backend.prefix_logits(x).float()  # (K, B, classes)
        y = y.cpu()
        hits = (logits.argmax(dim=-1) == y.unsqueeze(0)).sum(dim=1)
        correct = hits if correct is None else correct + hits
        # each row's loss as evaluate() takes it, added in float64: the sum then depends on how the
        # rows are cut into batches and replicas only by float64 rounding
        loss_sum += F.cross_entropy(logits[-1], y, reduction="none").double().sum().item()
        n += len(y)
    if correct is None:  # an empty split (data.val_fraction 0): empty on every replica
        return evaluate(backend, _Empty(), batch_size)
    total = comm.sum_over_replicas(torch.cat([correct.double(), torch.tensor([loss_sum, float(n)],
                                                                            dtype=torch.float64)]))
    n = int(total[-1])
    prefix = [c / n for c in total[:-2].round().long().tolist()]
    return {"accuracy": prefix[-1], "loss": float(total[-2]) / n, "prefix_accuracy": prefix, "samples": n}


class _Empty:
    y: tuple = ()


def epoch_record(*, epoch: int, step: int, losses: list[float], val: dict, lr: float, seconds: float,
                 train_seconds: float, done: int, stopped: bool) -> dict:
    """One line of metrics.jsonl: epoch counts as done unless the run stopped mid-epoch (then
    `epoch_batches` says how far it got)."""
    record = {"epoch": epoch + (0 if stopped else 1), "step": step,
              "train_loss": sum(losses) / len(losses) if losses else None,
              "val_accuracy": val["accuracy"], "val_loss": val["loss"],
              "val_prefix_accuracy": val["prefix_accuracy"], "lr": lr,
              "seconds": round(seconds, 3), "train_seconds": round(train_seconds, 3)}
    record.update({f"val_{k}": v for k, v in val.get("extra", {}).items()})  # an LM's bits per byte
    if stopped:
        record["epoch_batches"] = done
    return record
