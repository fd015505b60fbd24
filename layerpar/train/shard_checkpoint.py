"""Writing a checkpoint from every rank of a worker group, in the format checkpoint.py reads.

Each rank writes its own branch pieces (weights and AdamW state) into one staging directory
`checkpoints/.tmp-step_NNNNNNN-<token>` under the run's storage; rank 0 adds the embedding and the
head, then -- once every rank's file hashes have reached it, i.e. every file is written -- the
manifest, and renames the directory into place. So a reader sees the whole checkpoint or nothing, and
it loads with any number of workers or in one process (load_checkpoint, sha256 verified).

Storage is a local (or NFS) path, or any URI pyarrow opens (`file://`, `s3://`, `gs://`): the same
store Ray Train is given. On a local filesystem the files are fsynced and the rename is atomic. Object
stores have no atomic rename (pyarrow would copy every object), so there the ranks write straight into
the checkpoint's directory and the manifest, written last by rank 0, is what marks it complete, as it
does for every reader of this format. Every other rank waits for that manifest with its own bound,
train.save_timeout_s (wait_published), not in a collective bounded by parallel.timeout_s.

The driver finds and verifies checkpoints on the same storage (find_checkpoint, verify_stored) before
any rank starts.
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
    _STEP_DIR,
    _TMP_PREFIX,
    CHECKPOINTS,
    FORMAT,
    MANIFEST,
    CheckpointError,
    _fsync_dir,
    _serialise,
    _write_file,
    parse_manifest,
    piece_file,
    step_dir_name,
)

SUPERSEDED = "superseded-"  # checkpoints/superseded-<attempt>/: a history an explicit resume left


def open_storage(storage: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path on it) of a local path or a URI; CheckpointError if it cannot be opened."""
    if "://" in storage:
        try:
            return pafs.FileSystem.from_uri(storage)
        except (OSError, ValueError) as exc:  # pyarrow.ArrowInvalid is a ValueError
            raise CheckpointError(f"cannot open storage {storage!r}: {exc}") from None
    return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(storage))


def resolve_storage(cfg, run_dir: Path) -> str:
    """Where a distributed run keeps its checkpoints: train.storage, or the run directory's parent
    (absolute: Ray Train needs one); the run's own directory there is <storage>/<run name>."""
    storage = cfg.train.storage or str(Path(run_dir).resolve().parent)
    return storage.rstrip("/") if "://" in storage else str(Path(storage).expanduser().resolve())


def _kind(fs: pafs.FileSystem, path: str) -> pafs.FileType:
    return fs.get_file_info(path).type


def stored_checkpoints(fs: pafs.FileSystem, run_root: str) -> list[str]:
    """Complete checkpoints (those with a manifest) under run_root/checkpoints, oldest first."""
    found = []
    for entry in fs.get_file_info(pafs.FileSelector(f"{run_root}/{CHECKPOINTS}", allow_not_found=True)):
        m = _STEP_DIR.match(entry.base_name)
        if m and entry.type == pafs.FileType.Directory \
                and _kind(fs, f"{entry.path}/{MANIFEST}") == pafs.FileType.File:
            found.append((int(m.group(1)), entry.path))
    return [p for _, p in sorted(found)]


def find_checkpoint(fs: pafs.FileSystem, path: str) -> str | None:
    """`path` if it is a checkpoint, else the newest complete one of the run directory (or its
    checkpoints/ directory) `path`; None if there is none."""
    path = path.rstrip("/")
    if _kind(fs, f"{path}/{MANIFEST}") == pafs.FileType.File:
        return path
    if os.path.basename(path) == CHECKPOINTS:
        path = os.path.dirname(path)
    found = stored_checkpoints(fs, path)
    return found[-1] if found else None


def stored_manifest(fs: pafs.FileSystem, ckpt: str) -> dict[str, Any]:
    """The manifest of the checkpoint `ckpt` on `fs`, checked for format."""
    where = storage_uri(fs, f"{ckpt}/{MANIFEST}")
    try:
        with fs.open_input_stream(f"{ckpt}/{MANIFEST}") as f:
            raw = f.read()
    except OSError as exc:  # FileNotFoundError included
        raise CheckpointError(f"{where}: manifest is unreadable ({exc})") from None
    return parse_manifest(raw, where)


def verify_stored(fs: pafs.FileSystem, ckpt: str) -> dict[str, Any]:
    """Read the manifest and every file it lists, each checked against its sha256 (the driver, before
    any rank starts); returns the manifest. CheckpointError names the first bad file."""
    manifest = stored_manifest(fs, ckpt)
    for name, sha in sorted(manifest["files"].items()):
        where, digest = storage_uri(fs, f"{ckpt}/{name}"), hashlib.sha256()
        try:
            with fs.open_input_stream(f"{ckpt}/{name}") as f:
                while chunk := f.read(1 << 22):
                    digest.update(chunk)
        except FileNotFoundError:
            raise CheckpointError(f"{where}: file listed in the manifest is missing") from None
        except OSError as exc:
            raise CheckpointError(f"{where}: unreadable ({exc})") from None
        if digest.hexdigest() != sha:
            raise CheckpointError(
                f"{where}: sha256 does not match the manifest (the file is corrupted or truncated)")
    return manifest


def supersede(fs: pafs.FileSystem, run_root: str, after_step: int, tag: str) -> list[str]:
    """Move the complete checkpoints of `run_root` newer than `after_step` into
    checkpoints/superseded-<tag>/ (an explicit resume from an earlier checkpoint starts a new history:
    the newest checkpoint in checkpoints/ is then always this history's). Returns their new paths."""
    moved = []
    for path in stored_checkpoints(fs, run_root):
        if int(_STEP_DIR.match(os.path.basename(path)).group(1)) > after_step:
            dest = f"{run_root}/{CHECKPOINTS}/{SUPERSEDED}{tag}"
            fs.create_dir(dest, recursive=True)
            fs.move(path, f"{dest}/{os.path.basename(path)}")
            moved.append(f"{dest}/{os.path.basename(path)}")
    return moved


def prune_stored(fs: pafs.FileSystem, run_root: str, keep: int) -> None:
    """Delete all but the newest `keep` complete checkpoints of `run_root` (rank 0, after a save)."""
    found = stored_checkpoints(fs, run_root)
    for old in found[: max(0, len(found) - max(1, keep))]:
        fs.delete_dir(old)


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
                 extra: dict | None = None, token: str | None = None, publish_delay_s: float = 0.0) -> str:
    """Called by every rank of a branch group together. `root` is the run's directory on `fs`;
    returns the checkpoint's path on `fs` (the same on every rank). `token` (the same on every rank)
    goes into the manifest as `save_id`, for wait_published; by default rank 0's. publish_delay_s
    (tests only): rank 0 publishes that much later, as a slow object store would."""
    final = checkpoint_path(root, step)
    local = isinstance(fs, pafs.LocalFileSystem)
    if not local and comm.rank == 0 and _kind(fs, f"{final}/{MANIFEST}") != pafs.FileType.NotFound:
        fs.delete_file(f"{final}/{MANIFEST}")  # rewritten in place: incomplete until the new manifest
    token = comm.share_objects(token or uuid.uuid4().hex[:8])[0]  # rank 0's; after the delete above
    # local: a staging dir renamed into place (atomic); object stores: in place (no copy of every object)
    tmp = f"{root}/{CHECKPOINTS}/{_TMP_PREFIX}{step_dir_name(step)}-{token}" if local else final
    replicated = comm.rank == 0  # embed and head are the same on every rank: rank 0 writes them
    fs.create_dir(tmp, recursive=True)
    info = _write_pieces(fs, tmp, shard.pieces(replicated=replicated),
                         shard.optim_pieces(replicated=replicated))
    infos = comm.share_objects(info)  # once rank 0 holds every rank's hashes, every file is written
    if comm.rank == 0:
        time.sleep(publish_delay_s)
        manifest = _manifest(infos, cfg_dict=cfg.to_dict(), step=step, epoch=epoch, extra=extra or {})
        manifest["save_id"] = token
        # the manifest is written last: a directory without one is never taken for a checkpoint
        _write(fs, f"{tmp}/{MANIFEST}", json.dumps(manifest, indent=1).encode())
        if local:
            _fsync_dir(Path(tmp))
            _publish(fs, tmp, final)
    return final


class SaveTimeout(RuntimeError):
    """A rank waited longer than train.save_timeout_s for rank 0 to publish a checkpoint."""


def wait_published(fs: pafs.FileSystem, final: str, token: str, timeout_s: float) -> None:
    """Wait (at most `timeout_s`) until the checkpoint `final` of save `token` is published: its
    manifest is in place and carries that save_id. The ranks other than rank 0 call it after a save,
    so they wait here, with the save's own bound, and not in the next collective."""
    deadline, pause = time.monotonic() + timeout_s, 0.05
    while True:
        try:
            with fs.open_input_stream(f"{final}/{MANIFEST}") as f:
                if json.loads(f.read().decode()).get("save_id") == token:
                    return
        except (OSError, ValueError):  # not there yet (or being replaced)
            pass
        if time.monotonic() > deadline:
            raise SaveTimeout(f"checkpoint {storage_uri(fs, final)} was not published within "
                              f"train.save_timeout_s={timeout_s:g} s")
        time.sleep(pause)
        pause = min(1.0, pause * 2)


def clean_staging(fs: pafs.FileSystem, root: str) -> None:
    """Remove staging dirs a crashed save left behind (rank 0, before training starts)."""
    selector = pafs.FileSelector(f"{root}/{CHECKPOINTS}", allow_not_found=True)
    for entry in fs.get_file_info(selector):
        if entry.base_name.startswith(_TMP_PREFIX) and entry.type == pafs.FileType.Directory:
            fs.delete_dir(entry.path)
