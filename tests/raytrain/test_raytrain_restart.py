"""Ray Train tier: a 3-epoch run of 2 ranks reports what the single process does (per-epoch losses and
accuracies, the final test accuracy), writes the run's files, and its checkpoint loads in one process;
SIGKILL of one rank of a mesh after the epoch-1 checkpoint makes Ray Train restart the group from that
checkpoint, and the final weights are bit-identical to the uninterrupted run's; a loss beyond
train.max_failures is one line. (A W = 2 group's restart, from a checkpoint written but not yet
registered, is test_raytrain_resume.py's; an outside SIGKILL by the chaos drill, test_chaos_train.py's.)"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from layerpar.train.checkpoint import list_checkpoints, load_checkpoint
from layerpar.train.local import LocalBackend
from layerpar.train.loop import run_training
from layerpar.train.raytrain import TrainingError
from tests.parity import loss_atol
from tests.raytrain.conftest import final_weights, tiny

pytestmark = pytest.mark.ray
EPOCHS = 3
# 480 synthetic images: 11 batches of 32 per epoch, a checkpoint after every epoch
SETS = [f"train.epochs={EPOCHS}", "data.synthetic_size=480", "train.keep_checkpoints=5",
        "parallel.workers=2"]


@pytest.fixture(scope="module")
def clean(local_ray, tmp_path_factory):
    return run_training(tiny(*SETS), tmp_path_factory.mktemp("clean") / "run", progress=False)


def lines(result) -> list[dict]:
    return [json.loads(s) for s in (Path(result["run_dir"]) / "metrics.jsonl").read_text().splitlines()]


def test_run_reports_what_the_single_process_does(clean, tmp_path):
    one = run_training(tiny(*SETS, "parallel.workers=0"), tmp_path / "one", progress=False)
    got, want = lines(clean), lines(one)
    assert [r["epoch"] for r in got] == [r["epoch"] for r in want] == [1, 2, 3]
    for g, w in zip(got, want, strict=True):
        assert g["val_prefix_accuracy"] == w["val_prefix_accuracy"] and g["step"] == w["step"]
        assert g["train_loss"] == pytest.approx(w["train_loss"], abs=loss_atol(tiny()))
    assert clean["test_accuracy"] == one["test_accuracy"]
    assert clean["prefix_accuracy"] == one["prefix_accuracy"]
    # the run's files and result fields
    run_dir = Path(clean["run_dir"])
    assert json.loads((run_dir / "result.json").read_text()) == clean
    assert clean["storage"] == str(run_dir) and clean["failures"] == 0 and clean["restarts"] == []
    assert [Path(p).name for p in list_checkpoints(run_dir)] == ["step_0000011", "step_0000022",
                                                                   "step_0000033"]
    assert clean["checkpoint"] == str(run_dir / "checkpoints" / "step_0000033")
    assert len(clean["phases"]) == 2
    assert {"compute_ms", "collectives_ms", "data_ms"} <= set(clean["phases"][1])
    # the training time outside the steps: validation, checkpoints (every epoch here), their reports
    assert all(p["eval_s"] > 0 and p["checkpoint_s"] > 0 and p["report_s"] >= 0 for p in clean["phases"])
    assert clean["total_seconds"] >= clean["train_seconds"] > 0
    assert len(clean["worker_nodes"]) == 2 and all(clean["worker_nodes"])


def test_checkpoint_of_two_ranks_loads_in_one_process(clean):
    ckpt = load_checkpoint(clean["checkpoint"])  # every file's sha256 verified
    assert sorted(ckpt.tensors) == ["branch.0", "branch.1", "branch.2", "branch.3", "embed", "head"]
    assert sorted(ckpt.optim) == sorted(ckpt.tensors) and ckpt.step == clean["steps"] == 33
    backend = LocalBackend(tiny(*SETS, "parallel.workers=0"), checkpoint=clean["checkpoint"])
    from layerpar.data import load_dataset

    assert backend.evaluate(load_dataset(backend.cfg).test)["accuracy"] == clean["test_accuracy"]


def test_more_failures_than_allowed_fail_with_one_line(local_ray, tmp_path, monkeypatch):
    monkeypatch.setenv("LAYERPAR_CHAOS_KILL", "epoch=1,rank=1")
    with pytest.raises(TrainingError, match=r"train.max_failures=0") as info:
        run_training(tiny(*SETS, "train.max_failures=0"), tmp_path / "chaos", progress=False)
    assert "\n" not in str(info.value)


# 2 replicas x 1 branch rank (2 Ray Train ranks), 2 epochs: a checkpoint after each
MESH = [*SETS, "parallel.replicas=2", "parallel.workers=1", "train.epochs=2"]


def test_killed_rank_of_a_mesh_restarts_it_bit_identical(local_ray, tmp_path, monkeypatch):
    """SIGKILL of the second replica's rank (it writes no checkpoint) after the epoch-1 checkpoint: Ray
    Train restarts the whole mesh from that checkpoint (written by replica 0 alone) and the run ends at
    the same bits."""
    clean_mesh = run_training(tiny(*MESH), tmp_path / "clean", progress=False)
    monkeypatch.setenv("LAYERPAR_CHAOS_KILL", "epoch=1,rank=1")  # replica 1
    result = run_training(tiny(*MESH, "train.max_failures=1"), tmp_path / "chaos", progress=False)
    (kill,) = result["chaos_kills"]
    assert result["failures"] == 1 and result["restarts"][0]["checkpoint"].endswith("step_0000011")
    assert kill["pid"] == result["worker_pids"][1][0] != result["worker_pids"][1][1]
    assert result["steps"] == clean_mesh["steps"] == 22
    ckpt = load_checkpoint(result["checkpoint"])  # today's format: every piece, written once
    assert sorted(ckpt.tensors) == ["branch.0", "branch.1", "branch.2", "branch.3", "embed", "head"]
    want, got = final_weights(clean_mesh), final_weights(result)
    assert got.keys() == want.keys()
    for name, value in want.items():
        assert torch.equal(got[name], value), name
