"""Ray Train tier: a run on your own images (data.name: folder, a tree of generated PNGs and JPEGs)
trains on 2 ranks with its checkpoints in train.storage, learns the classes, and reports what the
single process does."""

from __future__ import annotations

from pathlib import Path

import pytest
import ray

from layerpar.train.checkpoint import load_checkpoint
from layerpar.train.loop import run_training
from tests.imagefolder import make_tree
from tests.raytrain.conftest import tiny

pytestmark = pytest.mark.ray


def test_image_folder_run_on_two_ranks(local_ray, state_tracking, tmp_path):
    root = make_tree(tmp_path / "imgs", per_class=24, test_per_class=8, side=12)
    sets = ["data.name=folder", f"data.root={root}", "model.num_classes=3", "train.epochs=4",
            "train.batch_size=16", "data.val_fraction=0.2"]
    store = tmp_path / "store"  # train.storage: checkpoints go to STORAGE/<run name>/checkpoints
    got = run_training(tiny(*sets, "parallel.workers=2", f"train.storage={store}"), tmp_path / "ranks",
                       progress=False)
    one = run_training(tiny(*sets), tmp_path / "one", progress=False)
    assert got["dataset"] == "folder" and got["workers"] == 2
    assert got["storage"] == str(store / "ranks")
    assert Path(got["checkpoint"]).parent == store / "ranks" / "checkpoints"
    assert load_checkpoint(got["checkpoint"]).epoch == 4
    assert got["test_accuracy"] >= 0.6  # 3 classes: chance is 1/3
    assert got["prefix_accuracy"] == one["prefix_accuracy"]
    # what the Ray dashboard's Train view reads (its /api/train/v2/runs/v1 asks this state actor)
    from ray.train.v2._internal.state.state_actor import get_state_actor

    runs = ray.get(get_state_actor().get_train_runs.remote())
    assert any(r.name == "ranks" for r in runs.values()), [r.name for r in runs.values()]
