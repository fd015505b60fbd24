"""Ray Train tier on GPUs: parallel.gpus_per_worker = 1 gives each rank its own GPU and the group
NCCL; 5 float64 batches end at the CPU single process's weights. Skipped where no GPU is present.

    python -m pytest -q tests/raytrain/test_raytrain_gpu.py      # on a machine with 1+ GPUs
"""

from __future__ import annotations

import pytest
import torch

from layerpar.train.checkpoint import load_checkpoint
from layerpar.train.loop import run_training
from tests.raytrain.conftest import final_weights, tiny

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (none found)"),
]
FIVE = ["train.epochs=1", "train.batch_size=16", "data.limit_train=80", "model.dtype=float64"]
GPU_ATOL = 1e-8  # float64; GPU kernels sum in another order than the CPU's (still ~1e-15 per op)


def test_a_gpu_per_rank_with_nccl_equals_the_cpu_single_process(local_ray, tmp_path):
    if local_ray.cluster_resources().get("GPU", 0) < 1:
        pytest.skip("the local Ray instance sees no GPU")
    workers = min(2, torch.cuda.device_count(), int(local_ray.cluster_resources()["GPU"]))
    got = run_training(tiny(*FIVE, f"parallel.workers={workers}", "parallel.gpus_per_worker=1"),
                       tmp_path / "gpu", progress=False)
    one = run_training(tiny(*FIVE), tmp_path / "cpu", progress=False)
    manifest = load_checkpoint(got["checkpoint"]).manifest
    assert manifest["config"]["parallel"]["gpus_per_worker"] == 1 and got["workers"] == workers
    want = final_weights(one)
    for name, value in final_weights(got).items():  # checkpoints hold CPU tensors
        torch.testing.assert_close(value, want[name], atol=GPU_ATOL, rtol=0, msg=name)


def test_a_mesh_of_two_gpu_replicas_equals_the_cpu_single_process(local_ray, tmp_path):
    """R = 2 replicas x W = 1 on two GPUs (NCCL cannot put two ranks on one GPU)."""
    if torch.cuda.device_count() < 2 or local_ray.cluster_resources().get("GPU", 0) < 2:
        pytest.skip("a mesh of GPU ranks needs 2 GPUs (NCCL allows one rank per GPU)")
    got = run_training(tiny(*FIVE, "parallel.workers=1", "parallel.replicas=2",
                            "parallel.gpus_per_worker=1"), tmp_path / "gpu", progress=False)
    one = run_training(tiny(*FIVE), tmp_path / "cpu", progress=False)
    assert (got["replicas"], got["workers"]) == (2, 1)
    want = final_weights(one)
    for name, value in final_weights(got).items():
        torch.testing.assert_close(value, want[name], atol=GPU_ATOL, rtol=0, msg=name)
