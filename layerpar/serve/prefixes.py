"""How good each prefix model is, and the fewest branches a latency target may answer with.

    acc = run_prefix_accuracy(ckpt_dir, manifest)        # PrefixAccuracy or None (no run records)
    floor = prefix_floor(cfg, acc)                       # Floor(k, notes); ValueError: nothing meets it

A latency target (serve.latency_slo_ms) answers from a prefix of the branches when the full model
would be late. Progressive training makes every prefix a good classifier; joint training does not (on
digits one branch of a joint-trained model is ~46% accurate, the full model 98%). The run that trained
a checkpoint recorded each prefix's validation accuracy (metrics.jsonl, one line per epoch, beside
checkpoints/): the server reads it, says it at start-up and in ModelInfo, and the operator sets the
floor: serve.min_branches (a count) and serve.min_prefix_accuracy (the smallest prefix at least that
accurate). A request's own min_branches can only raise the floor; an explicit num_branches is
answered as asked.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from layerpar.train.metrics_log import read_metrics

WEAK_GAP = 0.05  # a prefix this much less accurate than the full model is worth a start-up warning


@dataclass(frozen=True)
class PrefixAccuracy:
    accuracy: list[float]  # k = 1..N
    source: str  # where the figures come from, for people: "validation, epoch 8 (step 88)"


@dataclass(frozen=True)
class Floor:
    k: int  # the fewest branches a latency target answers with (1: no floor)
    notes: list[str] = field(default_factory=list)  # start-up lines: what is known and chosen
    warnings: list[str] = field(default_factory=list)


def _records(path: Path) -> list[dict]:
    """The run's epoch records (train/metrics_log.py reads them as training writes them); none when
    unreadable: serving then says the accuracies are unknown."""
    try:
        return read_metrics(path)
    except OSError:
        return []


def run_prefix_accuracy(ckpt_dir: Path | None, manifest: dict, num_branches: int) -> PrefixAccuracy | None:
    """The validation accuracy of every prefix at this checkpoint's step, from the run directory that
    holds it (RUN/checkpoints/step_N -> RUN/metrics.jsonl); None when the run's records are absent."""
    if ckpt_dir is None or ckpt_dir.parent.name != "checkpoints":
        return None
    run_dir = ckpt_dir.parent.parent
    step, epoch = manifest.get("step"), manifest.get("epoch")
    best = None
    for rec in _records(run_dir / "metrics.jsonl"):
        acc = rec.get("val_prefix_accuracy")
        if not isinstance(acc, list) or len(acc) != num_branches or any(a is None for a in acc):
            continue
        if rec.get("step") == step or (best is None and rec.get("epoch") == epoch):
            best = rec
    if best is not None:
        return PrefixAccuracy([float(a) for a in best["val_prefix_accuracy"]],
                              f"validation, epoch {best.get('epoch')} (step {best.get('step')})")
    try:  # a run without a validation split: its final result, if it ends at this checkpoint
        result = json.loads((run_dir / "result.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None
    acc = result.get("prefix_accuracy") if isinstance(result, dict) else None
    same = result.get("checkpoint") and Path(result["checkpoint"]).name == ckpt_dir.name
    if same and isinstance(acc, list) and len(acc) == num_branches and None not in acc:
        return PrefixAccuracy([float(a) for a in acc], "test split, the run's result")
    return None


def _table(acc: PrefixAccuracy) -> str:
    return ", ".join(f"k={k} {a:.3f}" for k, a in enumerate(acc.accuracy, 1))


def prefix_floor(cfg, acc: PrefixAccuracy | None) -> Floor:
    """The latency target's floor from serve.min_branches and serve.min_prefix_accuracy; ValueError
    (one sentence) when min_prefix_accuracy is set and no prefix, not even the full model, meets it."""
    s, n = cfg.serve, cfg.model.num_branches
    if cfg.model.kind != "paraformer":
        return Floor(n)
    k = max(1, s.min_branches)
    notes, warnings = [], []
    if acc is not None:
        notes.append(f"prefix accuracy ({acc.source}): {_table(acc)}")
    if s.min_prefix_accuracy > 0:
        if acc is None:
            warnings.append(f"serve.min_prefix_accuracy={s.min_prefix_accuracy:g} but the accuracy of "
                            "the prefixes is unknown (no metrics.jsonl beside the checkpoint's run): "
                            "the latency target answers with every branch")
            k = n
        else:
            meets = [i for i, a in enumerate(acc.accuracy, 1) if a >= s.min_prefix_accuracy]
            if not meets:
                raise ValueError(
                    f"serve.min_prefix_accuracy ({s.min_prefix_accuracy:g}) is met by no prefix of this "
                    f"checkpoint (best {max(acc.accuracy):.3f}, {acc.source}); lower it or serve a "
                    "better checkpoint")
            k = max(k, meets[0])
    if s.latency_slo_ms > 0:
        notes.append(f"latency target {s.latency_slo_ms:g} ms: answers with {k}..{n} branches")
        if acc is not None and acc.accuracy[k - 1] < acc.accuracy[-1] - WEAK_GAP:
            warnings.append(
                f"the latency target may answer with {k} branch(es), whose accuracy is "
                f"{acc.accuracy[k - 1]:.3f} against {acc.accuracy[-1]:.3f} for all {n} ({acc.source}); "
                "set serve.min_branches or serve.min_prefix_accuracy to keep weaker prefixes out")
    return Floor(k, notes, warnings)
