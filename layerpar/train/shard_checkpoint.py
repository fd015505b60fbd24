"""Writing a checkpoint from every rank of a worker group, in the format checkpoint.py reads.

Each rank writes its own branch pieces (weights and AdamW state) into one staging directory
`checkpoints/.tmp-step_NNNNNNN-<token>` under the run's storage; rank 0 adds the embedding and the
head, then -- once every rank's file hashes have reached it, i.e. every file is written -- the
manifest, and renames the directory into place. So a reader sees the whole checkpoint or nothing, and
it loads with any number of workers or in one process (load_checkpoint, sha256 verified).

Storage is a local (or NFS) path, or any URI pyarrow opens (`s3://`, `gs://`): the same store Ray
Train is given. On a local filesystem the files are fsynced and the rename is atomic; object stores
have no atomic rename (pyarrow copies), so there the manifest, written last, is what marks a
checkpoint complete, as it does for every reader of this format.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import uuid
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs
import torch

from layerpar.train.checkpoint import (
    _TMP_PREFIX,
    CHECKPOINTS,
    FORMAT,
    MANIFEST,
    _fsync_dir,
    _serialise,
    _write_file,
    piece_file,
    step_dir_name,
)


def open_storage(storage: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path on it) of a local path or a URI."""
    if "://" in storage:
        return pafs.FileSystem.from_uri(storage)
    return pafs.LocalFileSystem(), os.path.abspath(storage)


def storage_uri(fs: pafs.FileSystem, path: str) -> str:
    """How a user names a path on `fs`: a plain path locally, else `<scheme>://path`."""
    if isinstance(fs, pafs.LocalFileSystem):
        return path
    return f"{fs.type_name}://{path}"


def _write(fs: pafs.FileSystem, path: str, data: bytes) -> None:
    if isinstance(fs, pafs.LocalFileSystem):
        _write_file(Path(path), data)  # fsynced
        return
    with fs.open_output_stream(path) as f:
        f.write(data)


def _write_pieces(fs, tmp: str, pieces: dict, optim: dict) -> dict[str, Any]:
    """Write this rank's files; returns what the manifest needs about them."""
    info: dict[str, Any] = {"files": {}, "pieces": {}, "optim": {}}
    for kind, source in (("pieces", pieces), ("optim", optim)):
        for piece in sorted(source):
            name = ("optim." if kind == "optim" else "") + piece_file(piece)
            data = _serialise(source[piece])
            _write(fs, f"{tmp}/{name}", data)
            info["files"][name] = hashlib.sha256(data).hexdigest()
            info[kind][piece] = name
    return info


def _manifest(infos: list[dict], *, cfg_dict: dict, step: int, epoch: int, extra: dict) -> dict:
    merged: dict[str, dict] = {"files": {}, "pieces": {}, "optim": {}}
    for info in infos:
        for key in merged:
            merged[key].update(info[key])
    return {
        "format": FORMAT, "step": int(step), "epoch": int(epoch),
        "model": {"kind": cfg_dict["model"]["kind"], "num_branches": cfg_dict["model"]["num_branches"]},
        "pieces": dict(sorted(merged["pieces"].items())), "optim": dict(sorted(merged["optim"].items())),
        "files": dict(sorted(merged["files"].items())),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "torch": torch.__version__,
        "extra": extra, "config": cfg_dict,
    }


def _publish(fs, tmp: str, final: str) -> None:
    """Rename the staging dir into place; an existing checkpoint of the same step is replaced."""
    if fs.get_file_info(final).type != pafs.FileType.NotFound:
        old = f"{os.path.dirname(final)}/{_TMP_PREFIX}old-{os.path.basename(final)}-{uuid.uuid4().hex[:8]}"
        fs.move(final, old)
        fs.move(tmp, final)
        fs.delete_dir(old)
    else:
        fs.move(tmp, final)  # os.rename on a local filesystem: atomic
    if isinstance(fs, pafs.LocalFileSystem):
        _fsync_dir(Path(final).parent)


def checkpoint_path(root: str, step: int) -> str:
    """Where save_sharded publishes the checkpoint of `step` under the run's directory `root`."""
    return f"{root}/{CHECKPOINTS}/{step_dir_name(step)}"


def save_sharded(fs: pafs.FileSystem, root: str, shard, comm, *, cfg, step: int, epoch: int,
                 extra: dict | None = None) -> str:
    """Called by every rank together. `root` is the run's directory on `fs` (Ray Train's experiment
    directory); returns the checkpoint's path on `fs` (the same on every rank)."""
    final = checkpoint_path(root, step)
    token = comm.share_objects(uuid.uuid4().hex[:8])[0]  # rank 0's: one staging dir for all
    tmp = f"{root}/{CHECKPOINTS}/{_TMP_PREFIX}{step_dir_name(step)}-{token}"
    replicated = comm.rank == 0  # embed and head are the same on every rank: rank 0 writes them
    fs.create_dir(tmp, recursive=True)
    info = _write_pieces(fs, tmp, shard.pieces(replicated=replicated),
                         shard.optim_pieces(replicated=replicated))
    infos = comm.share_objects(info)  # once rank 0 holds every rank's hashes, every file is written
    if comm.rank == 0:
        manifest = _manifest(infos, cfg_dict=cfg.to_dict(), step=step, epoch=epoch, extra=extra or {})
        # the manifest is written last: a directory without one is never taken for a checkpoint
        _write(fs, f"{tmp}/{MANIFEST}", json.dumps(manifest, indent=1).encode())
        if isinstance(fs, pafs.LocalFileSystem):
            _fsync_dir(Path(tmp))
        _publish(fs, tmp, final)
    return final


def clean_staging(fs: pafs.FileSystem, root: str) -> None:
    """Remove staging dirs a crashed save left behind (rank 0, before training starts)."""
    selector = pafs.FileSelector(f"{root}/{CHECKPOINTS}", allow_not_found=True)
    for entry in fs.get_file_info(selector):
        if entry.base_name.startswith(_TMP_PREFIX) and entry.type == pafs.FileType.Directory:
            fs.delete_dir(entry.path)
