"""Fixtures of the fault tests: a local Ray instance and the chaos helpers (layerpar/runtime/chaos.py). Every
model is a real Para-Former; every fault is a real SIGKILL or a real stall."""

from __future__ import annotations

import pytest

from tests.faults.helpers import load_chaos
from tests.local_ray import start_local_ray


@pytest.fixture(scope="session")
def local_ray():
    import ray

    started = start_local_ray()  # tests/local_ray.py
    yield ray
    if started:
        ray.shutdown()


@pytest.fixture(scope="session")
def chaos():
    return load_chaos()




@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Every fault test compares workers with a one-thread reference (see tests/conftest.py)."""
    yield
