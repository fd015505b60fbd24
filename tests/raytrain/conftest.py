"""A local Ray instance for the Ray Train tier, shared by its tests and shut down at the end, and the
helpers its tests share: tiny configs, runs of the single process and of the worker group."""

from __future__ import annotations

import logging
import os

import pytest
import ray
import torch

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # loopback only


@pytest.fixture(scope="session")
def local_ray():
    # 4 logical CPUs on a 2-core machine: 3 one-CPU ranks (one thread each) plus a Tune trial fit;
    # they only time-share the cores. Ray Train's controller takes none.
    started = not ray.is_initialized()
    if started:
        os.environ.setdefault("RAY_worker_niceness", "0")  # ranks do the work; not behind the driver
        ray.init(address="local", num_cpus=4, include_dashboard=False, logging_level=logging.WARNING)
    yield ray
    if started:
        ray.shutdown()


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Ranks run one torch thread; the single-process reference must add its floats the same way."""
    yield


def tiny(*sets: str):
    """The packaged tiny config (4 branches, width 16, synthetic data) with overrides."""
    from layerpar.config import load_config

    return load_config("tiny", ["parallel.timeout_s=60", *sets])


def final_weights(result) -> dict[str, torch.Tensor]:
    from layerpar.train.checkpoint import load_checkpoint, model_state

    return model_state(load_checkpoint(result["checkpoint"]))
