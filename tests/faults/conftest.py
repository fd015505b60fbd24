"""Fixtures of the fault tests: a local Ray instance and the chaos helpers (launch/chaos.py). Every
model is a real Para-Former; every fault is a real SIGKILL or a real stall."""

from __future__ import annotations

import logging

import pytest
import torch

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
def one_thread():
    # Workers run one torch thread; the reference model must add its floats the same way.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
