"""Fixtures of the fault tests: a local Ray instance and the chaos helpers (layerpar/runtime/chaos.py). Every
model is a real Para-Former; every fault is a real SIGKILL or a real stall."""

from __future__ import annotations

import logging

import pytest

from tests.faults.helpers import load_chaos


@pytest.fixture(scope="session")
def local_ray():
    import ray

    started = not ray.is_initialized()
    if started:
        ray.init(address="local", num_cpus=4, include_dashboard=False, logging_level=logging.WARNING)
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
