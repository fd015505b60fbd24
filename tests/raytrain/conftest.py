"""A local Ray instance for the Ray Train tier, shared by its tests and shut down at the end, and the
helpers its tests share: tiny configs, runs of the single process and of the worker group."""

from __future__ import annotations

import os

import pytest
import ray
import torch

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # loopback only

from tests.local_ray import start_local_ray


@pytest.fixture(scope="session")
def local_ray():
    started = start_local_ray()  # tests/local_ray.py: how many CPUs and why
    yield ray
    if started:
        ray.shutdown()


@pytest.fixture
def state_tracking(monkeypatch):
    """Ray Train's state actor on, as launch/train.py keeps it (tests/conftest.py turns it off for the
    tests that do not read it): the chaos drill and the dashboard's Train view read it."""
    monkeypatch.setenv("RAY_TRAIN_ENABLE_STATE_TRACKING", "1")


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
