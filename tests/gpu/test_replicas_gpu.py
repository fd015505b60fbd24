"""GPU tier of the replica groups (issue 17): R = 2 groups of W = 1 worker, one GPU each, on local
Ray; answers equal the single-process model's and both groups answer. Skipped with fewer than 2 GPUs.

Run on a GPU machine:  python -m pytest -q tests/gpu
"""

import logging
import os

import pytest
import torch

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_AUTH_MODE", "token")

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(torch.cuda.device_count() < 2,
                       reason=f"needs 2 CUDA devices (found {torch.cuda.device_count()})"),
]


def test_two_groups_one_gpu_each_match_the_single_process():
    import ray

    from layerpar.config import load_config
    from layerpar.runtime.replicas import ReplicaSet
    from layerpar.train.local import LocalBackend

    cfg = load_config("tiny", ["parallel.workers=1", "parallel.replicas=2", "parallel.gpus_per_worker=1",
                               "parallel.cpus_per_worker=1"])
    ray.init(address="local", include_dashboard=False, num_gpus=2, logging_level=logging.WARNING)
    try:
        x = torch.randn(8, 1, 8, 8, generator=torch.Generator().manual_seed(0))
        want = LocalBackend(load_config("tiny")).infer(x)
        with ReplicaSet(cfg) as rs:
            for _ in range(4):
                logits, meta = rs.infer_with_meta(x)
                torch.testing.assert_close(logits, want, atol=1e-4, rtol=1e-4)
            assert all(c >= 2 for c in rs.calls), rs.calls
    finally:
        ray.shutdown()
