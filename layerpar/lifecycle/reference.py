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

What the tensors do not fix is never guessed silently: the pooling comes from the config and the
report says so; of the channel / patch-side splits of p*p*C the common reading -- grey or RGB, at most
one of which can fit -- is taken and the report says so beside the other readings that also fit
(see _patch_geometry); what no grey or RGB reading explains, and non-square grids and patch widths,
are refused. Weights that are NaN or infinite, and files holding anything but tensors, are refused
with the tensor or the pickled object named.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from pathlib import Path
from typing import Any

import torch

from layerpar.config import load_config, parse_override
from layerpar.lifecycle.common import LifecycleError, dir_bytes, new_run_dir, num_params, write_run
from layerpar.lifecycle.reference_io import load_reference_state
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
COMMON_CHANNELS = (1, 3)  # grey, RGB: read from the tensors unaided (p*p and 3*q*q never both fit)
OTHER_CHANNELS = (4,)  # RGBA: named beside the common reading when it also fits, never taken unaided
DATA_CHANNELS = {"digits": 1, "fashion_mnist": 1, "cifar10": 3, "cifar100": 3}  # synthetic: any
SHAPE_FIELDS = ("kind", "image_size", "in_channels", "patch_size", "num_classes", "dim", "heads",
                "head_dim", "mlp_dim", "num_branches", "branch_depth", "style", "qkv_bias")
GEOMETRY_FLAGS = {"in_channels": "--channels", "patch_size": "--patch-size", "image_size": "--image-size"}


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


def _fits(reading: tuple[int, int], grid: int, hints: dict[str, tuple[int, str]]) -> bool:
    c, p = reading
    value = {"in_channels": c, "patch_size": p, "image_size": grid * p}
    return all(value[field] == v for field, (v, _) in hints.items())


def _patch_geometry(patch_dim: int, num_patches: int, hints: dict[str, tuple[int, str]]
                    ) -> tuple[int, int, int, str]:
    """(in_channels, patch_size, image_size, where they came from) from the patch Linear's width
    p*p*C and the T - 1 patch positions. The tensors fix only p*p*C and the grid; hints
    (field -> (value, where it was given)) pick the reading, or else the common one -- 1 or 3
    channels in patches of side >= 2; at most one fits, since p*p = 3*q*q has no whole solution --
    is taken, and `where` names the RGBA reading that also fits (e.g. the authors' grey 224 px
    Fashion-MNIST in 16x16 patches is also 4 channels in 8x8). No common reading: refused."""
    grid = math.isqrt(num_patches)
    if grid * grid != num_patches:
        raise LifecycleError(
            f"pos_embedding holds {num_patches} patch positions, not a square grid: the model was "
            "built for non-square images or patches, and layerpar models are square")
    readings = [(patch_dim // (p * p), p) for p in range(1, math.isqrt(patch_dim) + 1)
                if patch_dim % (p * p) == 0]  # every square patch side p with p*p*C == patch_dim
    if hints:
        given = " and ".join(where for _, where in hints.values())
        keep = [r for r in readings if _fits(r, grid, hints)]  # a channel or side fixes the rest
        if not keep:
            raise LifecycleError(
                f"{given} does not fit the weights: the patch embedding reads {patch_dim} values per "
                f"patch on the {grid}x{grid} patch grid, which no square patch of that shape gives (layerpar "
                "models use square patches and images); check --channels, --patch-size, --image-size")
        (c, p), = keep
        return c, p, grid * p, given
    common = [(c, p) for c, p in readings if c in COMMON_CHANNELS and p >= 2]
    if not common:
        raise LifecycleError(
            f"the patch embedding reads {patch_dim} values per patch, which no square patch of side "
            ">= 2 with 1 or 3 channels gives: the model has another channel count, 1-pixel or "
            "non-square patches (layerpar's are square); pass --channels, --patch-size or --image-size")
    (c, p), = common  # p*p*1 == q*q*3 has no whole solution: at most one common reading
    also = [f"{c2} channels in {p2}x{p2} patches ({grid * p2}x{grid * p2} images)"
            for c2, p2 in readings if c2 in OTHER_CHANNELS and p2 >= 2]
    name = "grey" if c == 1 else "RGB"
    where = f"the tensors (the common reading: {name}" + (
        f"; {' or '.join(also)} also fits the same tensors: pass --channels "
        f"{also[0].split()[0]} for that" if also else "") + ")"
    return c, p, grid * p, where


def infer_shape(state: dict[str, torch.Tensor], *, where: str = "state dict",
                hints: dict[str, tuple[int, str]] | None = None) -> tuple[dict[str, Any], str]:
    """The ModelConfig fields the tensors fix, and where the image geometry came from; errors
    list missing and unexpected keys. hints: see _patch_geometry."""
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
    try:
        channels, patch, side, source = _patch_geometry(
            state["to_patch_embedding.1.weight"].shape[1], state["pos_embedding"].shape[1] - 1,
            hints or {})
    except LifecycleError as exc:
        raise LifecycleError(f"{where}: {exc}") from None
    return {
        "kind": "paraformer", "image_size": side, "in_channels": channels, "patch_size": patch,
        "num_classes": state["mlp_head.1.weight"].shape[0], "dim": dim, "heads": REF_HEADS,
        "head_dim": 0 if inner == dim else head_dim,
        "mlp_dim": state["paraformerbranches.branches.0.1.fn.net.0.weight"].shape[0],
        "num_branches": num_branches, "branch_depth": branch_depth,
        "style": "reference", "qkv_bias": False,
    }, source


def convert_state(state: dict[str, torch.Tensor], mcfg, where: str = "state dict"
                  ) -> dict[str, torch.Tensor]:
    """Reference tensors -> layerpar state dict (float32) for the model mcfg describes; shapes checked
    against a freshly built model."""
    target = ParaFormer(mcfg).state_dict()
    out = {}
    for ours, theirs in key_map(mcfg.num_branches, mcfg.branch_depth).items():
        t = state[theirs].detach().to(torch.float32)
        if not (finite := torch.isfinite(t)).all():  # else every prediction fails, blaming the input
            bad, nan = int((~finite).sum()), int(torch.isnan(t).sum())
            raise LifecycleError(
                f"{where}: {theirs} holds {bad} of {t.numel()} values that are not finite ({nan} NaN, "
                f"{bad - nan} infinite): the weights are damaged (a diverged run or a broken save) and "
                "every prediction would be NaN; refused")
        if t.shape != target[ours].shape:
            raise LifecycleError(f"{where}: {theirs} has shape {tuple(t.shape)} but the inferred "
                                 f"model needs {tuple(target[ours].shape)} for {ours}")
        out[ours] = t.contiguous()
    return out


# ----------------------------------------------------------------------------- import


def _split_overrides(overrides: list[str] | None) -> tuple[dict[str, tuple[Any, str]], list[str]]:
    """model.<field> overrides of what the tensors decide ({field: (value, "--set ...")}) and the
    rest. The first are checked against the tensors (the geometry ones pick a reading) instead of
    being applied, so a base config never meets them half-set."""
    fixed, rest = {}, []
    for item in overrides or []:
        keys, value = parse_override(item)
        if len(keys) == 2 and keys[0] == "model" and keys[1] in SHAPE_FIELDS:
            fixed[keys[1]] = (value, f"--set {item}")
        else:
            rest.append(item)
    return fixed, rest


def _geometry_hints(flags: dict[str, int | None], fixed: dict[str, tuple[Any, str]],
                    data: tuple[int, str] | None) -> dict[str, tuple[int, str]]:
    """{field: (value, where)} from the CLI flags, model.* overrides and a named dataset's channel
    count; sources that disagree are refused."""
    found: dict[str, list[tuple[Any, str]]] = {}
    for field, flag in GEOMETRY_FLAGS.items():
        if flags.get(field) is not None:
            found.setdefault(field, []).append((flags[field], f"{flag} {flags[field]}"))
        if field in fixed:
            found.setdefault(field, []).append(fixed[field])
    if data is not None:  # the run has to read its dataset: a channel count that differs is refused
        found.setdefault("in_channels", []).append(data)
    hints = {}
    for field, given in found.items():
        for value, where in given:
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise LifecycleError(f"{where}: model.{field} must be a whole number >= 1")
        if len({value for value, _ in given}) > 1:
            raise LifecycleError(f"{' and '.join(w for _, w in given)} disagree on model.{field}; "
                                 "make them agree")
        hints[field] = given[0]
    return hints


def _named_data(config: str | None, rest: list[str], name: str) -> tuple[int, str] | None:
    """The channel count of the run's dataset, when the user named it (--config or data.name)."""
    named = config is not None or any(parse_override(o)[0] == ["data", "name"] for o in rest)
    channels = DATA_CHANNELS.get(name) if named else None
    return (channels, f"data.name={name} ({channels} channel{'s' * (channels > 1)})") if channels else None


def _assumptions(shape: dict[str, Any], pool: str, pool_from: str, geometry_from: str) -> dict[str, str]:
    side, patch = shape["image_size"], shape["patch_size"]
    return {
        "pool": f"model.pool={pool!r} from {pool_from}: the pooling is not stored in the weights and "
                "cannot be inferred; choose it with --set model.pool=mean or --set model.pool=cls",
        "geometry": f"{shape['in_channels']} channel(s), {patch}x{patch} patches, {side}x{side} images, "
                    f"from {geometry_from}; square images and patches are assumed (a non-square one "
                    "whose patch grid is square cannot be told from the weights); choose with "
                    "--channels, --patch-size, --image-size",
    }


def import_reference(state_dict_path: str | Path, out_dir: str | Path, *, num_classes: int | None = None,
                     in_channels: int | None = None, patch_size: int | None = None,
                     image_size: int | None = None, config: str | None = None,
                     overrides: list[str] | None = None) -> dict[str, Any]:
    """Convert the authors' state dict into RUN_DIR out_dir (checkpoints/step_0000000 + config.yaml).

    The model shape comes from the tensors; `config`/`overrides` set everything else (data, train,
    model.pool, ...). in_channels, patch_size, image_size (or model.* overrides, or a named dataset's
    channel count) pick the image geometry where p*p*C alone is ambiguous; num_classes and model.*
    overrides of other shape fields must agree with the tensors. Returns a report dict whose
    "assumed" entry says what the weights do not record (the pooling) and where the geometry came from."""
    where = str(state_dict_path)
    state = load_reference_state(state_dict_path)
    fixed, rest = _split_overrides(overrides)
    base = load_config(config, rest)
    flags = {"in_channels": in_channels, "patch_size": patch_size, "image_size": image_size}
    hints = _geometry_hints(flags, fixed, _named_data(config, rest, base.data.name))
    shape, geometry_from = infer_shape(state, where=where, hints=hints)
    if num_classes is not None and num_classes != shape["num_classes"]:
        raise LifecycleError(f"{where}: mlp_head predicts {shape['num_classes']} classes, "
                             f"not the {num_classes} asked for")
    for field, (value, given) in fixed.items():
        if field not in GEOMETRY_FLAGS and value != shape[field]:
            raise LifecycleError(f"{where}: the weights fix model.{field} = {shape[field]!r}, not the "
                                 f"{value!r} of {given}")
    cfg = base.replace(model=shape,
                       parallel={"workers": min(base.parallel.workers, shape["num_branches"])})
    weights = convert_state(state, cfg.model, where)
    out = new_run_dir(out_dir)
    ckpt = write_run(out, weights, cfg, extra={"imported_from": str(Path(state_dict_path).resolve()),
                                               "source": "DUAT-Maker/Shallow-Paraformer"})
    pool_from = next((f"--set {o}" for o in reversed(rest) if parse_override(o)[0] == ["model", "pool"]),
                     f"--config {config}" if config else "layerpar's default")
    return {"command": "import-reference", "source": where, "run_dir": str(out),
            "checkpoint": str(ckpt), "model": shape, "pool": cfg.model.pool,
            "assumed": _assumptions(shape, cfg.model.pool, pool_from, geometry_from),
            "params": num_params(weights), "bytes": dir_bytes(ckpt)}


EPILOG = """\
What the weights do not say:
  the pooling: model.pool comes from --config or --set model.pool=mean|cls (default cls); a mean-pool
    model imported as cls gives wrong logits, so name it. The report's "assumed" entry says which.
  the image geometry: the tensors fix only channels * patch * patch and the patch grid. The common
    reading -- grey (1) or RGB (3) images in square patches of side >= 2; at most one of the two
    fits -- is taken, and the report's "assumed" entry (and a note on stderr) names any RGBA reading
    that fits the same tensors (e.g. grey 224 px in 16x16 patches is also 4 channels in 8x8). Pick
    another with --channels, --patch-size or --image-size (or --set model.in_channels=...,
    model.patch_size=..., model.image_size=..., or a named dataset: --set data.name=cifar10). What no
    grey or RGB reading explains, and non-square images or patches where the grid shows them, are
    refused (layerpar models are square).
  damaged weights: a NaN or infinite value in any tensor is refused at import, naming the tensor."""


def cli_main(argv: list[str] | None = None) -> int:
    """layerpar import-reference STATE_DICT.pt --out RUN_DIR [--set data.name=cifar10 ...]"""
    ap = argparse.ArgumentParser(
        prog="layerpar import-reference", epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Convert a state dict of the authors' Para-Former (DUAT-Maker/Shallow-Paraformer) "
                    "into a layerpar run directory; the model shape is read from the tensors.")
    ap.add_argument("state_dict", help="a .pt file holding model.state_dict() (or {'net': ...})")
    ap.add_argument("--out", required=True, help="new run directory to create")
    ap.add_argument("--config", default=None, help="base config (YAML path or packaged name) for the "
                    "non-model sections and model.pool")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="config override, e.g. data.name=cifar10 or model.pool=mean (repeatable)")
    ap.add_argument("--num-classes", type=int, default=None, help="check the head has this many")
    ap.add_argument("--channels", type=int, default=None,
                    help="image channels (default: inferred; needed when the tensors allow two readings "
                         "or for counts other than 1, 3, 4)")
    ap.add_argument("--patch-size", type=int, default=None, help="side of the square patch (default: "
                    "inferred)")
    ap.add_argument("--image-size", type=int, default=None, help="side of the square image (default: "
                    "inferred)")
    args = ap.parse_args(argv)
    report = import_reference(args.state_dict, args.out, num_classes=args.num_classes,
                              in_channels=args.channels, patch_size=args.patch_size,
                              image_size=args.image_size, config=args.config, overrides=args.overrides)
    if "from --set" not in report["assumed"]["pool"]:  # a guess: say so where a person reads it
        print(f"layerpar import-reference: note: {report['assumed']['pool']}", file=sys.stderr)
    if "also fits" in report["assumed"]["geometry"]:  # another reading fits the same tensors
        print(f"layerpar import-reference: note: {report['assumed']['geometry']}", file=sys.stderr)
    print(json.dumps(report))
    return 0
