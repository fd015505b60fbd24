"""A trained language model back from its checkpoint, in one process (no Ray, no process group).

    model, cfg = load_lm("runs/20260101-120000-text-paraformer_lm")   # a run dir: its newest checkpoint
    model, cfg = load_lm(".../checkpoints/step_0000400", branch_ids=[2, 3])   # a worker's share
    text = ByteTokenizer().decode(generate(model, [prompt_ids], 64)[0])

The checkpoint is any the training loop wrote (train/lm_shard.py: one process or Ray Train, any
worker layout -- its pieces are "embed", "head", "branch.<b>" or, for the serial GPT, "blocks"):
the config is the one its manifest carries (`overrides`: `section.key=value` strings applied on
top, e.g. model.dtype=float64), and every file read is checked against its sha256. The model comes
back in eval mode. Raises CheckpointError (one sentence) for a missing or damaged checkpoint or one
that is not a language model's.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from layerpar.config import Config, ConfigError, from_dict, with_overrides
from layerpar.config_rules import LM_KINDS
from layerpar.model.lm import build_lm
from layerpar.train.checkpoint import CheckpointError, load_weights, read_manifest


def lm_checkpoint_config(path: str | Path, overrides: Sequence[str] | None = None) -> Config:
    """The validated config a checkpoint (or a run directory's newest) was trained with."""
    manifest = read_manifest(path)
    try:
        cfg = from_dict(manifest["config"])
        if overrides:
            cfg = with_overrides(cfg, list(overrides))
    except (KeyError, ConfigError) as exc:
        raise CheckpointError(f"{path}: the checkpoint's config is not usable ({exc})") from None
    if cfg.model.kind not in LM_KINDS:
        raise CheckpointError(f"{path} holds a {cfg.model.kind} model, not a language model "
                              f"({', '.join(LM_KINDS)})")
    return cfg


def load_lm(path: str | Path, *, overrides: Sequence[str] | None = None,
            branch_ids: Sequence[int] | None = None, device: torch.device | str = "cpu"):
    """(model, cfg): the ParaFormerLM (all its branches, or only `branch_ids`) or SerialLM of a
    checkpoint or run directory, its weights loaded, in eval mode on `device`."""
    cfg = lm_checkpoint_config(path, overrides)
    if branch_ids is not None and cfg.model.kind != "paraformer_lm":
        raise CheckpointError(f"{path} holds the serial baseline; it has no branches to take a share of")
    model = build_lm(cfg.model, seed=cfg.train.seed, branch_ids=branch_ids)
    ckpt = load_weights(path)
    flat = {k: v for piece in ckpt.tensors.values() for k, v in piece.items()}
    own = model.state_dict()
    missing = [k for k in own if k not in flat]
    if missing:
        raise CheckpointError(f"{ckpt.path} lacks {len(missing)} weights of this model, e.g. {missing[0]}")
    bad = [k for k in own if flat[k].shape != own[k].shape]
    if bad:
        raise CheckpointError(f"{ckpt.path}: weight {bad[0]} has shape {tuple(flat[bad[0]].shape)}, the "
                              f"model expects {tuple(own[bad[0]].shape)} (do the overrides change its size?)")
    model.load_state_dict({k: flat[k] for k in own})  # cast to the model's dtype
    return model.to(device).eval(), cfg
