"""Ray Train tier: the SPMD loop (every rank runs it under a TorchTrainer) ends at the single process's
weights after 5 batches, both modes, W = 1, 2, 3 and meshes of R = 2 replicas x W = 1, 2 branch
ranks -- float64 to 1e-10 (the algebra), float32 within the step-size tolerance of tests/parity.py --
and reports the same losses and accuracies."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from layerpar.train.loop import run_training
from tests.parity import assert_weights_match, loss_atol
from tests.raytrain.conftest import final_weights, tiny

pytestmark = pytest.mark.ray
FIVE = ["train.epochs=1", "train.batch_size=16", "data.limit_train=80"]  # 5 batches of 16


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """The single-process run of each (mode, dtype), trained once for the module."""
    runs: dict = {}

    def get(mode: str, dtype: str, *sets: str) -> dict:
        key = (mode, dtype, *sets)
        if key not in runs:
            cfg = tiny(*FIVE, f"train.mode={mode}", f"model.dtype={dtype}", *sets)
            runs[key] = run_training(cfg, tmp_path_factory.mktemp(f"one-{mode}-{dtype}"), progress=False)
        return runs[key]

    return get


def metrics(result) -> list[dict]:
    return [json.loads(s) for s in (Path(result["run_dir"]) / "metrics.jsonl").read_text().splitlines()]


def assert_same_run(got: dict, one: dict, cfg) -> float:
    """Weights within the dtype's rule; the same evaluation, inside the loop: losses within the
    dtype's tolerance (a mesh's loss is its replicas' shares summed), accuracies equal. Returns the
    largest weight difference."""
    assert got["steps"] == one["steps"]
    worst = assert_weights_match(final_weights(got), final_weights(one), cfg, steps=got["steps"],
                                 total_steps=got["steps"])
    (m_got,), (m_one,) = metrics(got), metrics(one)
    assert m_got["train_loss"] == pytest.approx(m_one["train_loss"], abs=loss_atol(cfg))
    assert m_got["val_prefix_accuracy"] == m_one["val_prefix_accuracy"]
    assert got["prefix_accuracy"] == one["prefix_accuracy"]
    assert got["test_loss"] == pytest.approx(one["test_loss"], abs=loss_atol(cfg))
    return worst


@pytest.mark.parametrize("dtype,workers,mode", [
    ("float64", 1, "joint"), ("float64", 2, "joint"), ("float64", 3, "progressive"),
    ("float32", 3, "progressive"),  # the float32 tolerance, on the largest group and most steps
])  # (W = 2 progressive is the 2 x 2 mesh's branch group below)
def test_five_batches_equal_single_process(local_ray, single, tmp_path, dtype, workers, mode):
    cfg = tiny(*FIVE, f"train.mode={mode}", f"model.dtype={dtype}", f"parallel.workers={workers}")
    one = single(mode, dtype)
    got = run_training(cfg, tmp_path / "run", progress=False)
    assert got["trainer"].startswith("ray.train.torch.TorchTrainer") and got["workers"] == workers
    assert got["steps"] == 5 * (5 if mode == "progressive" else 1)
    worst = assert_same_run(got, one, cfg)
    assert len(got["phases"]) == workers and all(p["steps"] == 5 for p in got["phases"])
    print(f"\n[parity] {dtype} W={workers} {mode}: max weight diff {worst:.1e}")


# the whole loop on a mesh (metrics, the replicas' loss, checkpoints); the algebra in every layout,
# mode and dtype is in tests/distributed/test_mesh.py (gloo processes, no Ray: seconds, not minutes)
@pytest.mark.parametrize("dtype,replicas,workers,mode,batch", [
    ("float64", 2, 2, "progressive", 16),
    ("float64", 2, 1, "joint", 15),  # shares of 8 and 7 rows (the last batch: 3 and 2)
])
def test_mesh_of_replicas_equals_single_process(local_ray, single, tmp_path, dtype, replicas, workers,
                                                mode, batch):
    """R replicas x W branch ranks, each replica on its share of every batch, end at the weights of
    the single process trained on the whole batches."""
    sets = [f"train.batch_size={batch}"]
    cfg = tiny(*FIVE, f"train.mode={mode}", f"model.dtype={dtype}", f"parallel.workers={workers}",
               f"parallel.replicas={replicas}", *sets)
    one = single(mode, dtype, *sets)
    got = run_training(cfg, tmp_path / "run", progress=False)
    assert (got["replicas"], got["workers"]) == (replicas, workers)
    assert len(got["phases"]) == len(got["worker_pids"]) == replicas * workers
    worst = assert_same_run(got, one, cfg)
    print(f"\n[parity] {dtype} R={replicas} W={workers} {mode}: max weight diff {worst:.1e}")
