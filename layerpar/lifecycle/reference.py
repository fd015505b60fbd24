"""Import a state dict of the authors' Para-Former (DUAT-Maker/Shallow-Paraformer, models/ParaFormer.py)
as a layerpar run.

    layerpar import-reference paraformer_cifar10.pt --out runs/ref --set data.name=cifar10
    run = import_reference("paraformer_cifar10.pt", "runs/ref")

Their layout, as this converter reads it (names are the state-dict keys):

    to_patch_embedding.1.{weight,bias}   Linear(p*p*C, D) after the (p1 p2 c) patch flattening
    cls_token (1, 1, D), pos_embedding (1, T, D)      x0 = cat(cls, patches) + pos
    paraformerbranches.branches.<b>.<2d>     PreNorm(Attention): norm.{weight,bias},
                                             fn.to_qkv.weight (no bias), fn.to_out.0.{weight,bias}
    paraformerbranches.branches.<b>.<2d+1>   PreNorm(FeedForward): norm.{weight,bias},
                                             fn.net.0.{weight,bias}, fn.net.3.{weight,bias}
    mlp_head.0.{weight,bias}, mlp_head.1.{weight,bias}   LayerNorm(D) -> Linear(D, classes)

Each sub-layer adds its residual to the normalised input (h' = LN(h) + F(LN(h)): the `reference` block
style); the branches' full outputs are summed, then pooled (CLS row or mean), then the head.
`to_qkv` has heads * inner rows with inner = heads * dim_head, and to_out reads inner columns, so the
forward only runs with 3 heads; per-head width is dim_head (64 by default, whatever D is).
"""

from __future__ import annotations

import argparse
import json
import math
import re
from pathlib import Path
from typing import Any

import torch

from layerpar.config import load_config
from layerpar.lifecycle.common import LifecycleError, dir_bytes, new_run_dir, num_params, write_run
from layerpar.model import ParaFormer

REF_HEADS = 3  # the only head count the reference forward is consistent with
BRANCH_KEY = re.compile(r"^paraformerbranches\.branches\.(\d+)\.(\d+)\.(.+)$")
EMBED_KEYS = {  # layerpar key -> reference key
    "embed.proj.weight": "to_patch_embedding.1.weight",
    "embed.proj.bias": "to_patch_embedding.1.bias",
    "embed.cls": "cls_token",
    "embed.pos": "pos_embedding",
    "head.norm.weight": "mlp_head.0.weight",
    "head.norm.bias": "mlp_head.0.bias",
    "head.fc.weight": "mlp_head.1.weight",
    "head.fc.bias": "mlp_head.1.bias",
}
ATTN_KEYS = {"ln1_w": "norm.weight", "ln1_b": "norm.bias", "qkv_w": "fn.to_qkv.weight",
             "proj_w": "fn.to_out.0.weight", "proj_b": "fn.to_out.0.bias"}
MLP_KEYS = {"ln2_w": "norm.weight", "ln2_b": "norm.bias", "fc1_w": "fn.net.0.weight",
            "fc1_b": "fn.net.0.bias", "fc2_w": "fn.net.3.weight", "fc2_b": "fn.net.3.bias"}
WRAPPERS = ("state_dict", "model_state_dict", "model", "net")  # {"net": sd, "acc": ..} and friends
PREFIXES = ("module.", "_orig_mod.")  # nn.DataParallel / DDP, torch.compile


def key_map(num_branches: int, branch_depth: int) -> dict[str, str]:
    """Every layerpar state-dict key -> the reference key it comes from."""
    out = dict(EMBED_KEYS)
    for b in range(num_branches):
        for d in range(branch_depth):
            for sub, names in ((2 * d, ATTN_KEYS), (2 * d + 1, MLP_KEYS)):
                ref = f"paraformerbranches.branches.{b}.{sub}."
                for ours, theirs in names.items():
                    out[f"branches.{b}.blocks.{d}.{ours}"] = ref + theirs
    return out


# ----------------------------------------------------------------------------- reading


def load_reference_state(path: str | Path) -> dict[str, torch.Tensor]:
    """torch.load with weights_only=True (no code runs), unwrapped to a flat {key: tensor} dict."""
    path = Path(path)
    if not path.is_file():
        raise LifecycleError(f"state dict {str(path)!r} does not exist")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle errors of every kind: the file is not a plain state dict
        raise LifecycleError(
            f"{path} could not be loaded with weights_only=True (save model.state_dict(), "
            f"not the model object): {str(exc).splitlines()[0]}"
        ) from None
    for _ in range(2):  # {"net": state_dict, "epoch": ..} as written by common training scripts
        if isinstance(obj, dict) and not any(isinstance(v, torch.Tensor) for v in obj.values()):
            inner = [obj[k] for k in WRAPPERS if isinstance(obj.get(k), dict)]
            if inner:
                obj = inner[0]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise LifecycleError(f"{path} does not hold a state dict of tensors")
    for prefix in PREFIXES:
        if obj and all(k.startswith(prefix) for k in obj):
            obj = {k[len(prefix):]: v for k, v in obj.items()}
    return dict(obj)


def _key_error(path: str, missing: list[str], unexpected: list[str]) -> LifecycleError:
    def show(keys: list[str]) -> str:
        head = ", ".join(keys[:12])
        return head + (f" (and {len(keys) - 12} more)" if len(keys) > 12 else "") if keys else "none"

    return LifecycleError(
        f"{path} does not match the reference Para-Former layout: missing keys: {show(missing)}; "
        f"unexpected keys: {show(unexpected)}"
    )


def _known(key: str) -> bool:
    m = BRANCH_KEY.match(key)
    if m:
        return m.group(3) in set(ATTN_KEYS.values()) | set(MLP_KEYS.values())
    return key in EMBED_KEYS.values()


def _patch_geometry(patch_dim: int, num_patches: int, *, in_channels: int | None,
                    patch_size: int | None, image_size: int | None) -> tuple[int, int, int]:
    """(in_channels, patch_size, image_size) from the patch Linear's width p*p*C and T - 1 patches."""
    grid = math.isqrt(num_patches)
    if grid * grid != num_patches:
        raise LifecycleError(f"pos_embedding has {num_patches} patches, not a square grid; "
                             "only square images are supported")
    if image_size is not None:
        if image_size % grid:
            raise LifecycleError(f"image size {image_size} is not a multiple of the {grid}x{grid} grid")
        patch_size = patch_size or image_size // grid
    if patch_size is not None:
        channels = [patch_dim // patch_size**2] if patch_dim % patch_size**2 == 0 else []
    else:
        channels = [in_channels] if in_channels else [3, 1]  # RGB first, then grey (never both fit)
    for c in channels:
        p = math.isqrt(patch_dim // c) if patch_dim % c == 0 else 0
        if p and p * p * c == patch_dim and (in_channels is None or in_channels == c) \
                and (patch_size is None or patch_size == p) and (image_size in (None, grid * p)):
            return c, p, grid * p
    raise LifecycleError(
        f"patch width {patch_dim} on a {grid}x{grid} grid does not fit the given channels/patch/image "
        "size; pass --channels, --patch-size or --image-size"
    )


def infer_shape(state: dict[str, torch.Tensor], *, where: str = "state dict",
                in_channels: int | None = None, patch_size: int | None = None,
                image_size: int | None = None) -> dict[str, Any]:
    """The ModelConfig fields the tensors fix; errors list missing and unexpected keys."""
    unexpected = sorted(k for k in state if not _known(k))
    subs: dict[int, set[int]] = {}
    for k in state:
        if m := BRANCH_KEY.match(k):
            subs.setdefault(int(m.group(1)), set()).add(int(m.group(2)))
    core = ["to_patch_embedding.1.weight", "cls_token", "pos_embedding", "mlp_head.1.weight",
            "paraformerbranches.branches.0.0.fn.to_qkv.weight",
            "paraformerbranches.branches.0.0.fn.to_out.0.weight",
            "paraformerbranches.branches.0.1.fn.net.0.weight"]
    missing = [k for k in core if k not in state]
    if missing:  # the shape cannot be read: report what is plainly absent
        raise _key_error(where, missing, unexpected)
    num_branches = max(subs) + 1
    branch_depth = (max(subs[0]) + 2) // 2  # sub-layers 0..2d+1 come in attention/MLP pairs
    expected = set(key_map(num_branches, branch_depth).values())
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise _key_error(where, missing, unexpected)

    dim = state["cls_token"].shape[-1]
    qkv_rows = state["paraformerbranches.branches.0.0.fn.to_qkv.weight"].shape[0]
    inner = state["paraformerbranches.branches.0.0.fn.to_out.0.weight"].shape[1]  # heads * dim_head
    if qkv_rows != REF_HEADS * inner or inner % REF_HEADS:
        raise LifecycleError(
            f"{where}: to_qkv has {qkv_rows} rows and to_out reads {inner} columns; the reference "
            f"forward only runs with {REF_HEADS} heads (to_qkv rows = 3 * to_out columns)"
        )
    head_dim = inner // REF_HEADS
    channels, patch, side = _patch_geometry(
        state["to_patch_embedding.1.weight"].shape[1], state["pos_embedding"].shape[1] - 1,
        in_channels=in_channels, patch_size=patch_size, image_size=image_size)
    return {
        "kind": "paraformer", "image_size": side, "in_channels": channels, "patch_size": patch,
        "num_classes": state["mlp_head.1.weight"].shape[0], "dim": dim, "heads": REF_HEADS,
        "head_dim": 0 if inner == dim else head_dim,
        "mlp_dim": state["paraformerbranches.branches.0.1.fn.net.0.weight"].shape[0],
        "num_branches": num_branches, "branch_depth": branch_depth,
        "style": "reference", "qkv_bias": False,
    }


def convert_state(state: dict[str, torch.Tensor], mcfg, where: str = "state dict"
                  ) -> dict[str, torch.Tensor]:
    """Reference tensors -> layerpar state dict (float32) for the model mcfg describes; shapes checked
    against a freshly built model."""
    target = ParaFormer(mcfg).state_dict()
    out = {}
    for ours, theirs in key_map(mcfg.num_branches, mcfg.branch_depth).items():
        t = state[theirs].detach().to(torch.float32)
        if t.shape != target[ours].shape:
            raise LifecycleError(f"{where}: {theirs} has shape {tuple(t.shape)} but the inferred "
                                 f"model needs {tuple(target[ours].shape)} for {ours}")
        out[ours] = t.contiguous()
    return out


# ----------------------------------------------------------------------------- import


def import_reference(state_dict_path: str | Path, out_dir: str | Path, *, num_classes: int | None = None,
                     in_channels: int | None = None, patch_size: int | None = None,
                     image_size: int | None = None, config: str | None = None,
                     overrides: list[str] | None = None) -> dict[str, Any]:
    """Convert the authors' state dict into RUN_DIR out_dir (checkpoints/step_0000000 + config.yaml).

    The model shape comes from the tensors; `config`/`overrides` set everything else (data, train,
    model.pool, ...). num_classes, in_channels, patch_size, image_size, when given, must agree with
    the tensors (channels and patch size are ambiguous from p*p*C alone: RGB is tried before grey).
    Returns a report dict."""
    where = str(state_dict_path)
    state = load_reference_state(state_dict_path)
    shape = infer_shape(state, where=where, in_channels=in_channels, patch_size=patch_size,
                        image_size=image_size)
    if num_classes is not None and num_classes != shape["num_classes"]:
        raise LifecycleError(f"{where}: mlp_head predicts {shape['num_classes']} classes, "
                             f"not the {num_classes} asked for")
    base = load_config(config, overrides)
    cfg = base.replace(model=shape,
                       parallel={"workers": min(base.parallel.workers, shape["num_branches"])})
    weights = convert_state(state, cfg.model, where)
    out = new_run_dir(out_dir)
    ckpt = write_run(out, weights, cfg, extra={"imported_from": str(Path(state_dict_path).resolve()),
                                               "source": "DUAT-Maker/Shallow-Paraformer"})
    return {"command": "import-reference", "source": where, "run_dir": str(out),
            "checkpoint": str(ckpt), "model": shape, "params": num_params(weights),
            "bytes": dir_bytes(ckpt)}


def cli_main(argv: list[str] | None = None) -> int:
    """layerpar import-reference STATE_DICT.pt --out RUN_DIR [--set data.name=cifar10 ...]"""
    ap = argparse.ArgumentParser(
        prog="layerpar import-reference",
        description="Convert a state dict of the authors' Para-Former (DUAT-Maker/Shallow-Paraformer) "
                    "into a layerpar run directory; the model shape is read from the tensors.")
    ap.add_argument("state_dict", help="a .pt file holding model.state_dict() (or {'net': ...})")
    ap.add_argument("--out", required=True, help="new run directory to create")
    ap.add_argument("--config", default=None, help="base config (YAML path or packaged name) for the "
                    "non-model sections")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="config override, e.g. data.name=cifar10 or model.pool=mean (repeatable)")
    ap.add_argument("--num-classes", type=int, default=None, help="check the head has this many")
    ap.add_argument("--channels", type=int, default=None, help="image channels (default: inferred)")
    ap.add_argument("--patch-size", type=int, default=None, help="patch side (default: inferred)")
    ap.add_argument("--image-size", type=int, default=None, help="image side (default: inferred)")
    args = ap.parse_args(argv)
    report = import_reference(args.state_dict, args.out, num_classes=args.num_classes,
                              in_channels=args.channels, patch_size=args.patch_size,
                              image_size=args.image_size, config=args.config, overrides=args.overrides)
    print(json.dumps(report))
    return 0
