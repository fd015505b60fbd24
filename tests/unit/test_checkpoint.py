"""Checkpoints: bit-exact round trips, refused damage naming the file, atomic saves, run dirs."""

from __future__ import annotations

import json

import pytest
import torch

import layerpar.train.checkpoint as ckpt_mod
from layerpar.train.checkpoint import (
    CheckpointError,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    model_state,
    save_checkpoint,
)
from layerpar.train.local import LocalBackend
from layerpar.train.optim import optimizer_state

pytestmark = pytest.mark.unit


def trained(cfg, steps=2, total=10):
    backend = LocalBackend(cfg, total_steps=total)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        x = torch.randn(8, 1, 8, 8, generator=g)
        backend.train_step(x, torch.randint(0, cfg.model.num_classes, (8,), generator=g))
    return backend


@pytest.fixture
def saved(tmp_path, tiny_cfg):
    """A backend after 2 steps and its checkpoint in a run dir."""
    backend = trained(tiny_cfg)
    path = backend.save(tmp_path, epoch=1, extra={"note": "x"})
    return backend, tmp_path, path


def test_round_trip_is_bit_exact(saved, tiny_cfg):
    backend, run_dir, path = saved
    assert path == run_dir / "checkpoints" / "step_0000002"
    names = sorted(p.name for p in path.iterdir())
    assert names == sorted(["manifest.json", "embed.safetensors", "head.safetensors",
                            *[f"branch_{i:03d}.safetensors" for i in range(4)],
                            "optim.embed.safetensors", "optim.head.safetensors",
                            *[f"optim.branch_{i:03d}.safetensors" for i in range(4)]])
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["format"] == "layerpar-checkpoint-v1"
    assert (manifest["step"], manifest["epoch"], manifest["extra"]) == (2, 1, {"note": "x"})
    assert set(manifest["files"]) == set(names) - {"manifest.json"}

    restored = LocalBackend(tiny_cfg, total_steps=10, checkpoint=run_dir)  # a run dir is accepted
    assert restored.step == 2
    want, got = backend.state_dict(), restored.state_dict()
    assert want.keys() == got.keys()
    assert all(torch.equal(want[k], got[k]) for k in want)
    opt_want = optimizer_state(backend.model, backend.opt)
    opt_got = optimizer_state(restored.model, restored.opt)
    assert opt_want.keys() == opt_got.keys() and len(opt_want) == 3 * len(want)
    assert all(torch.equal(opt_want[k], opt_got[k]) for k in opt_want)
    ckpt = load_checkpoint(path)  # a checkpoint dir is accepted too
    assert ckpt.config == tiny_cfg
    assert all(torch.equal(model_state(ckpt)[k], want[k]) for k in want)


def test_resumed_backend_steps_like_the_original(saved, tiny_cfg):
    backend, run_dir, _ = saved
    restored = LocalBackend(tiny_cfg, total_steps=10, checkpoint=run_dir)
    x, y = torch.randn(8, 1, 8, 8), torch.randint(0, 4, (8,))
    a, b = backend.train_step(x, y), restored.train_step(x, y)
    assert a == b
    assert all(torch.equal(v, restored.state_dict()[k]) for k, v in backend.state_dict().items())


def test_load_only_some_pieces(saved):
    _, _, path = saved
    ckpt = load_checkpoint(path, pieces=["embed", "branch.2"])
    assert sorted(ckpt.tensors) == ["branch.2", "embed"]
    assert all(k.startswith("branches.2.") for k in ckpt.tensors["branch.2"])
    assert sorted(ckpt.optim) == ["branch.2", "embed"]
    with pytest.raises(CheckpointError, match="no piece 'branch.9'"):
        load_checkpoint(path, pieces=["branch.9"])


def _damage(file, how):
    data = file.read_bytes()
    if how == "corrupt":  # one flipped byte deep inside the tensor data
        i = len(data) - 10
        file.write_bytes(data[:i] + bytes([data[i] ^ 0xFF]) + data[i + 1:])
    elif how == "truncate":
        file.write_bytes(data[: len(data) // 2])
    else:
        file.unlink()


@pytest.mark.parametrize("how", ["corrupt", "truncate", "delete"])
@pytest.mark.parametrize("name", ["branch_003.safetensors", "embed.safetensors",
                                  "optim.branch_001.safetensors"])
def test_damaged_file_is_refused_by_name(saved, tiny_cfg, how, name):
    _, run_dir, path = saved
    _damage(path / name, how)
    with pytest.raises(CheckpointError, match=name.replace(".", r"\.")):
        load_checkpoint(run_dir)
    with pytest.raises(CheckpointError, match=name.replace(".", r"\.")):
        LocalBackend(tiny_cfg, checkpoint=path)


def test_damaged_manifest_is_refused_by_name(saved):
    _, _, path = saved
    (path / "manifest.json").write_text('{"format": "layerpar-checkpoint-v1", "step": ')
    with pytest.raises(CheckpointError, match=r"manifest\.json"):
        load_checkpoint(path)


def test_interrupted_save_leaves_previous_checkpoint(saved, tiny_cfg, monkeypatch):
    backend, run_dir, first = saved
    backend.train_step(torch.randn(8, 1, 8, 8), torch.randint(0, 4, (8,)))
    real_write, calls = ckpt_mod._write_file, []

    def failing_write(path, data):  # the disk fills up on the fourth file of the save
        calls.append(path.name)
        if len(calls) == 4:
            real_write(path, data[: len(data) // 3])
            raise OSError(28, "No space left on device")
        real_write(path, data)

    monkeypatch.setattr(ckpt_mod, "_write_file", failing_write)
    with pytest.raises(OSError, match="No space"):
        backend.save(run_dir, epoch=2)
    monkeypatch.undo()
    assert len(calls) == 4
    assert [p.name for p in (run_dir / "checkpoints").iterdir()] == [first.name]  # no partial dir
    assert latest_checkpoint(run_dir) == first
    restored = LocalBackend(tiny_cfg, checkpoint=run_dir)
    assert restored.step == 2


def test_keeps_the_newest_k_and_finds_the_latest(tmp_path, tiny_cfg):
    backend = trained(tiny_cfg, steps=1)
    assert latest_checkpoint(tmp_path) is None
    with pytest.raises(CheckpointError, match="holds no checkpoint"):
        load_checkpoint(tmp_path)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope")
    pieces = {"embed": backend.model.piece_state("embed")}
    for step in (5, 10, 15, 20):
        save_checkpoint(tmp_path, pieces, config=tiny_cfg, step=step, epoch=step // 5, keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_0000015", "step_0000020"]
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoints" / "step_0000020"
    assert latest_checkpoint(tmp_path / "checkpoints") == latest_checkpoint(tmp_path)
    # saving the same step again replaces it whole
    again = save_checkpoint(tmp_path, pieces, config=tiny_cfg, step=20, epoch=9, keep=2)
    assert load_checkpoint(again).epoch == 9
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_0000015", "step_0000020"]
    # an explicit checkpoint directory is written exactly there
    exact = save_checkpoint(tmp_path / "export", pieces, config=tiny_cfg, step=1, epoch=0)
    assert exact == tmp_path / "export" and load_checkpoint(exact).step == 1


def test_checkpoint_must_fit_the_model(saved, tiny_cfg):
    _, run_dir, _ = saved
    wider = tiny_cfg.replace(model={"dim": 32})
    with pytest.raises(CheckpointError, match=r"model\.dim=16 .* 32"):
        LocalBackend(wider, checkpoint=run_dir)


def test_vit_checkpoint_uses_one_blocks_file(tmp_path, tiny_cfg):
    cfg = tiny_cfg.replace(model={"kind": "vit"})
    backend = trained(cfg, steps=1)
    path = backend.save(tmp_path, epoch=1)
    assert {p.name for p in path.iterdir() if not p.name.startswith("optim.")} == {
        "manifest.json", "embed.safetensors", "blocks.safetensors", "head.safetensors"}
    restored = LocalBackend(cfg, checkpoint=path)
    assert all(torch.equal(v, restored.state_dict()[k]) for k, v in backend.state_dict().items())


class _Pieces:
    """What save_sharded reads of a shard: its pieces (here the whole model's) and their optim state."""

    def __init__(self, state: dict) -> None:
        from layerpar.train.checkpoint import split_pieces

        self._pieces = split_pieces(state)

    def pieces(self, *, replicated: bool) -> dict:
        return self._pieces

    def optim_pieces(self, *, replicated: bool) -> dict:
        return {}


def test_object_store_save_writes_in_place_and_peers_wait_with_their_own_bound(tmp_path):
    """On a store that is not a local filesystem (an object store: here pyarrow's SubTreeFileSystem,
    which is no LocalFileSystem) a save copies nothing: the files go straight into the checkpoint's
    directory and the manifest, last, carries the save's id, which wait_published waits for with
    train.save_timeout_s; an earlier save of the same step does not count."""
    import pyarrow.fs as pafs

    from layerpar.config import load_config
    from layerpar.model import ParaFormer
    from layerpar.parallel.comm import LocalComm
    from layerpar.train.shard_checkpoint import SaveTimeout, save_sharded, wait_published

    cfg = load_config("tiny")
    fs = pafs.SubTreeFileSystem(str(tmp_path), pafs.LocalFileSystem())
    model = ParaFormer(cfg.model, seed=0)
    final = save_sharded(fs, "run", _Pieces(model.state_dict()), LocalComm(), cfg=cfg, step=5, epoch=1,
                         token="first")
    assert final == "run/checkpoints/step_0000005"
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["step_0000005"]
    wait_published(fs, final, "first", timeout_s=5)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    save_sharded(fs, "run", _Pieces(model.state_dict()), LocalComm(), cfg=cfg, step=5, epoch=1,
                 token="second")  # the same step again: rewritten in place
    wait_published(fs, final, "second", timeout_s=5)
    got = model_state(load_checkpoint(tmp_path / final))  # every sha256 verified
    assert all(torch.equal(got[k], v) for k, v in model.state_dict().items())
    with pytest.raises(SaveTimeout, match=r"not published within train.save_timeout_s=0.3 s"):
        wait_published(fs, final, "third", timeout_s=0.3)
