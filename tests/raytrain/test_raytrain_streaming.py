"""Ray Train tier, data.streaming: true. R replicas x W branch ranks in {1x1, 1x2, 2x1, 2x2}, each
replica group's leader reading its share of every batch with Ray Data and broadcasting it to its
branch ranks, end at the weights of the one-process streaming run to 1e-10 (float64) after 6 steps,
with the same accuracies (val and test split across the replicas, their counts summed); and a
SIGKILL of the leader mid-epoch (Ray Data stream open) restarts the group from the epoch checkpoint
and the run ends bit-identical to the uninterrupted one (float64 weights compared with torch.equal).
"""

from __future__ import annotations

import pytest
import torch

from layerpar.train.loop import run_training
from tests.imagefolder import make_tree
from tests.parity import assert_weights_match, loss_atol
from tests.ray.test_streaming_feed_ray import folder_cfg
from tests.raytrain.conftest import final_weights

pytestmark = pytest.mark.ray
# 18 training images (24 less a 25% val share), batches of 5 -> 4 batches an epoch, 2 epochs:
# shares of 3 + 2 rows (R = 2), and a last batch of 3 rows
RUNS: dict = {}


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    return make_tree(tmp_path_factory.mktemp("rt") / "imgs", per_class=8, test_per_class=3, side=10)


def run(tree, tmp_path_factory, replicas: int, workers: int, *sets: str) -> dict:
    key = (replicas, workers, *sets)
    if key not in RUNS:
        layout = [f"parallel.workers={workers}", f"parallel.replicas={replicas}"] if workers else \
            ["parallel.workers=0"]
        RUNS[key] = run_training(folder_cfg(tree, *layout, *sets),
                                 tmp_path_factory.mktemp(f"r{replicas}w{workers}") / "run", progress=False)
    return RUNS[key]


@pytest.mark.parametrize("replicas,workers", [(1, 1), (1, 2), (2, 1), (2, 2)])
def test_streamed_layouts_equal_the_one_process_streaming_run(local_ray, tree, tmp_path_factory,
                                                              replicas, workers):
    one = run(tree, tmp_path_factory, 1, 0)
    got = run(tree, tmp_path_factory, replicas, workers)
    cfg = folder_cfg(tree)
    assert got["steps"] == one["steps"] == 8 and got["trainer"].startswith("ray.train")
    worst = assert_weights_match(final_weights(got), final_weights(one), cfg, steps=8, total_steps=8)
    assert got["prefix_accuracy"] == one["prefix_accuracy"] and got["val_accuracy"] == one["val_accuracy"]
    assert got["test_loss"] == pytest.approx(one["test_loss"], abs=loss_atol(cfg))
    assert len(got["phases"]) == replicas * workers
    print(f"\n[streaming parity] R={replicas} W={workers}: max weight diff {worst:.1e}")


def test_leader_killed_mid_epoch_restarts_bit_identical(local_ray, tree, tmp_path_factory, monkeypatch):
    clean = run(tree, tmp_path_factory, 1, 2)
    # rank 0, the group's leader, SIGKILLs itself as it is handed batch 2 of epoch 1 (the epoch-0
    # checkpoint is on storage; its Ray Data stream is open)
    monkeypatch.setenv("LAYERPAR_CHAOS_KILL", "epoch=1,rank=0,batch=2")
    result = run_training(folder_cfg(tree, "parallel.workers=2", "train.max_failures=1"),
                          tmp_path_factory.mktemp("chaos") / "run", progress=False)
    (kill,) = result["chaos_kills"]
    assert kill["batch"] == 2 and result["failures"] == 1
    assert result["restarts"][0]["checkpoint"].endswith("checkpoints/step_0000004")
    assert result["steps"] == clean["steps"]
    want, got = final_weights(clean), final_weights(result)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
