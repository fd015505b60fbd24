"""Checkpoints: one safetensors file per piece of the model, a JSON manifest, written atomically.

A checkpoint is a directory:

    manifest.json              {"format": "layerpar-checkpoint-v1", "config", "step", "epoch",
                                "files": {name: sha256}, "pieces": {piece: file}, "optim": {...}, ...}
    embed.safetensors          the patch embedding (+CLS, +positions)
    head.safetensors           LayerNorm + linear head
    branch_003.safetensors     one file per Para-Former branch (a ViT has blocks.safetensors)
    optim.branch_003.safetensors   AdamW state of that piece, keyed by parameter name (optional)

It is written into a hidden temporary directory next to its destination and renamed into place with
one `os.rename`, so a crash mid-save never leaves a half-written checkpoint where a reader looks. A run
keeps its checkpoints under RUN_DIR/checkpoints/step_NNNNNNN and the last `keep` of them. Every API
that takes a checkpoint accepts the checkpoint directory itself or a RUN_DIR (its latest checkpoint).

    save_checkpoint(run_dir, pieces, config=cfg, step=120, epoch=3, optim=optim)
    ckpt = load_checkpoint(run_dir)             # sha256 of every file read is verified
    model.load_state_dict(model_state(ckpt))
    ckpt = load_weights(run_dir)                # serving: the weights only; optim.* is never read
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

FORMAT = "layerpar-checkpoint-v1"
MANIFEST = "manifest.json"
CHECKPOINTS = "checkpoints"
_STEP_DIR = re.compile(r"^step_(\d+)$")
_TMP_PREFIX = ".tmp-"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete, corrupted or does not fit; the message names the file."""


@dataclass
class Checkpoint:
    path: Path
    manifest: dict[str, Any]
    tensors: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    """Weights by piece ("embed", "head", "branch.3", "blocks"), keys as in the model's state_dict."""
    optim: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    """AdamW state by piece, keyed `<parameter name>.exp_avg|exp_avg_sq|step` (optim.optimizer_state)."""

    @property
    def config(self):
        """The run's Config, rebuilt (and validated) from the manifest."""
        return manifest_config(self.manifest, self.path / MANIFEST)

    @property
    def step(self) -> int:
        return int(self.manifest["step"])

    @property
    def epoch(self) -> int:
        return int(self.manifest["epoch"])


# ----------------------------------------------------------------------------- pieces and file names


def piece_of(name: str) -> str:
    """The piece a state-dict key belongs to: branches.3.blocks.0.qkv_w -> "branch.3",
    embed.pos -> "embed", head.fc.weight -> "head", blocks.5.fc1_w (ViT) -> "blocks"."""
    first, _, rest = name.partition(".")
    if first == "branches":
        return "branch." + rest.partition(".")[0]
    return first


def split_pieces(state: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """A flat state dict (or optimizer_state) -> {piece: {name: tensor}}, the layout save_checkpoint
    takes. The names stay whole, so merging the pieces gives back the flat dict."""
    out: dict[str, dict[str, torch.Tensor]] = {}
    for name, t in state.items():
        out.setdefault(piece_of(name), {})[name] = t
    return out


def piece_file(piece: str) -> str:
    """"branch.3" -> "branch_003.safetensors"; "embed" -> "embed.safetensors"."""
    if piece.startswith("branch."):
        return f"branch_{int(piece.split('.', 1)[1]):03d}.safetensors"
    if not re.fullmatch(r"[A-Za-z0-9_]+", piece):
        raise ValueError(f"piece name {piece!r} is not a plain word or branch.<id>")
    return f"{piece}.safetensors"


def step_dir_name(step: int) -> str:
    return f"step_{step:07d}"


# ----------------------------------------------------------------------------- finding checkpoints


def _is_checkpoint(path: Path) -> bool:
    return (path / MANIFEST).is_file()


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run (RUN_DIR or RUN_DIR/checkpoints), oldest first."""
    root = Path(run_dir)
    if (root / CHECKPOINTS).is_dir():
        root = root / CHECKPOINTS
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        m = _STEP_DIR.match(child.name)
        if m and _is_checkpoint(child):  # hidden temp dirs never match
            found.append((int(m.group(1)), child))
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint of a run, or None. A checkpoint dir is its own latest."""
    path = Path(run_dir)
    if _is_checkpoint(path):
        return path
    found = list_checkpoints(path)
    return found[-1] if found else None


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory, or a run directory -> its latest checkpoint; CheckpointError if none."""
    path = Path(path)
    if not path.exists() and not _restore_replaced(path):
        raise CheckpointError(f"checkpoint path {str(path)!r} does not exist")
    found = latest_checkpoint(path)
    if found is None:
        raise CheckpointError(
            f"{str(path)!r} holds no checkpoint (expected {MANIFEST}, or {CHECKPOINTS}/step_* with one)"
        )
    return found


def read_manifest(path: str | Path) -> dict[str, Any]:
    """The manifest of a checkpoint (or of a run's latest checkpoint), checked for format."""
    ckpt_dir = resolve_checkpoint(path)
    file = ckpt_dir / MANIFEST
    try:
        raw = file.read_bytes()
    except OSError as exc:
        raise CheckpointError(f"{file}: manifest is unreadable ({exc})") from None
    return parse_manifest(raw, file)


def parse_manifest(raw: bytes, file: str | Path) -> dict[str, Any]:
    """A manifest's bytes -> the manifest, checked for format; CheckpointError names `file`."""
    try:
        manifest = json.loads(raw.decode())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{file}: manifest is unreadable ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CheckpointError(f"{file}: not a {FORMAT} manifest")
    for key in ("config", "step", "epoch", "files", "pieces"):
        if key not in manifest:
            raise CheckpointError(f"{file}: manifest lacks {key!r}")
    return manifest


def check_sha256(file: str | Path, data: bytes, sha256: str) -> None:
    """CheckpointError naming `file` unless `data` hashes to `sha256`."""
    if hashlib.sha256(data).hexdigest() != sha256:
        raise CheckpointError(
            f"{file}: sha256 does not match the manifest (the file is corrupted or truncated)"
        )


# ----------------------------------------------------------------------------- saving


def _write_file(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _serialise(tensors: dict[str, torch.Tensor]) -> bytes:
    # contiguous CPU copies: safetensors refuses views and shared storage
    return st_save({k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()})


def _write_pieces(tmp: Path, pieces: dict, prefix: str, files: dict[str, str]) -> dict[str, str]:
    """One file per piece under tmp (name -> sha256 added to `files`); returns piece -> file name."""
    names = {}
    for piece in sorted(pieces):
        name = prefix + piece_file(piece)
        data = _serialise(pieces[piece])
        _write_file(tmp / name, data)
        files[name], names[piece] = hashlib.sha256(data).hexdigest(), name
    return names


def save_checkpoint(
    path: str | Path,
    pieces: dict[str, dict[str, torch.Tensor]],
    *,
    config,
    step: int,
    epoch: int,
    optim: dict[str, dict[str, torch.Tensor]] | None = None,
    extra: dict[str, Any] | None = None,
    keep: int | None = None,
) -> Path:
    """Write a checkpoint atomically and return its directory.

    `path` is either the checkpoint directory to create (replaced if it exists), or an existing
    directory that is not a checkpoint (a RUN_DIR): then the checkpoint goes to
    RUN_DIR/checkpoints/step_NNNNNNN and only the newest `keep` (default: config.train.keep_checkpoints)
    are kept. `config` is a Config (or its dict).
    """
    path = Path(path)
    cfg_dict = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    run_level = path.is_dir() and not _is_checkpoint(path)
    final = path / CHECKPOINTS / step_dir_name(step) if run_level else path
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f"{_TMP_PREFIX}{final.name}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        files: dict[str, str] = {}
        piece_files = _write_pieces(tmp, pieces, "", files)
        optim_files = _write_pieces(tmp, optim or {}, "optim.", files)
        manifest = {
            "format": FORMAT,
            "step": int(step),
            "epoch": int(epoch),
            "model": {"kind": cfg_dict["model"]["kind"], "num_branches": cfg_dict["model"]["num_branches"]},
            "pieces": piece_files,
            "optim": optim_files,
            "files": files,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "torch": torch.__version__,
            "extra": extra or {},
            "config": cfg_dict,
        }
        # the manifest is written last: a directory without one is never taken for a checkpoint
        _write_file(tmp / MANIFEST, json.dumps(manifest, indent=1).encode())
        _fsync_dir(tmp)
        _replace_dir(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_dir(final.parent)
    if run_level:
        prune_checkpoints(path, keep if keep is not None else cfg_dict["train"]["keep_checkpoints"])
    return final


def _replace_dir(tmp: Path, final: Path) -> None:
    """os.rename(tmp, final); an existing `final` is moved aside first and removed after."""
    if not final.exists():
        os.rename(tmp, final)  # atomic on one filesystem: readers see all of it or nothing
        return
    old = final.parent / f"{_TMP_PREFIX}old-{final.name}-{uuid.uuid4().hex[:8]}"
    os.rename(final, old)
    os.rename(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def _restore_replaced(final: Path) -> bool:
    """Finish a replacement that a crash cut between _replace_dir's two renames: the previous
    checkpoint sits complete in `.tmp-old-<name>-*`; move it back. True if one was restored."""
    if not final.parent.is_dir():
        return False
    for old in sorted(final.parent.glob(f"{_TMP_PREFIX}old-{final.name}-*")):
        if _is_checkpoint(old):
            os.rename(old, final)
            return True
    return False


def prune_checkpoints(run_dir: str | Path, keep: int) -> None:
    """Delete all but the newest `keep` checkpoints, and temp dirs left by a crashed save."""
    found = list_checkpoints(run_dir)
    for old in found[: max(0, len(found) - max(1, keep))]:
        shutil.rmtree(old, ignore_errors=True)
    root = Path(run_dir) / CHECKPOINTS
    if root.is_dir():
        for child in root.iterdir():
            if child.name.startswith(_TMP_PREFIX):
                shutil.rmtree(child, ignore_errors=True)


# ----------------------------------------------------------------------------- loading


def _read_verified(file: Path, sha256: str) -> dict[str, torch.Tensor]:
    if not file.is_file():
        raise CheckpointError(f"{file}: file listed in the manifest is missing")
    data = file.read_bytes()
    check_sha256(file, data, sha256)
    try:
        return st_load(data)
    except (SafetensorError, ValueError) as exc:  # sha matched but unreadable: a bad writer
        raise CheckpointError(f"{file}: not a readable safetensors file ({exc})") from None


def load_checkpoint(path: str | Path, pieces: list[str] | None = None, *,
                    with_optim: bool = True) -> Checkpoint:
    """Read a checkpoint (or a run's latest). `pieces` limits which pieces are read (a worker reads
    only its branches); every file read is checked against its sha256 in the manifest."""
    ckpt_dir = resolve_checkpoint(path)
    manifest = read_manifest(ckpt_dir)
    files = manifest["files"]
    wanted = sorted(manifest["pieces"]) if pieces is None else list(pieces)
    missing = [p for p in wanted if p not in manifest["pieces"]]
    if missing:
        raise CheckpointError(
            f"{ckpt_dir / MANIFEST}: checkpoint has no piece {missing[0]!r}; "
            f"it holds {', '.join(sorted(manifest['pieces']))}"
        )
    ckpt = Checkpoint(path=ckpt_dir, manifest=manifest)
    for piece in wanted:
        name = manifest["pieces"][piece]
        ckpt.tensors[piece] = _read_verified(ckpt_dir / name, files[name])
    if with_optim:
        for piece in wanted:
            name = manifest.get("optim", {}).get(piece)
            if name is not None:
                ckpt.optim[piece] = _read_verified(ckpt_dir / name, files[name])
    return ckpt


def load_weights(path: str | Path, pieces: list[str] | None = None) -> Checkpoint:
    """The weights of a checkpoint (or a run's latest), each file verified against its sha256; the
    optimizer state is neither read nor verified, so a damaged optim.* file does not stop serving."""
    return load_checkpoint(path, pieces, with_optim=False)


def manifest_config(manifest: dict[str, Any], where: str | Path = MANIFEST):
    """The run's Config rebuilt (and validated) from a manifest. Manifests written before the serving
    token left the config hold `serve.token`: it is dropped, never used (the token now comes from
    LAYERPAR_SERVE_TOKEN or serve.token_file only)."""
    from layerpar.config import ConfigError, from_dict

    raw = dict(manifest["config"])
    if isinstance(raw.get("serve"), dict):
        raw["serve"] = {k: v for k, v in raw["serve"].items() if k != "token"}
    try:
        return from_dict(raw)
    except ConfigError as exc:
        raise CheckpointError(f"{where}: stored config is invalid: {exc}") from None


def model_state(ckpt: Checkpoint) -> dict[str, torch.Tensor]:
    """The flat state dict of every piece read (keys as in the model's state_dict())."""
    return {k: v for piece in sorted(ckpt.tensors) for k, v in ckpt.tensors[piece].items()}


def optim_state(ckpt: Checkpoint) -> dict[str, torch.Tensor]:
    """The flat optimizer state of every piece read (see optim.load_optimizer_state)."""
    return {k: v for piece in sorted(ckpt.optim) for k, v in ckpt.optim[piece].items()}
