"""A local Ray instance for the ray tier, shared by the tier's tests and shut down at the end."""

import os

import pytest

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # loopback only

import ray  # noqa: E402 - a hard dependency: a broken install fails the tier, it does not skip it

from tests.local_ray import start_local_ray  # noqa: E402


@pytest.fixture(scope="session")
def local_ray():
    started = start_local_ray()  # tests/local_ray.py: how many CPUs and why
    yield ray
    if started:
        ray.shutdown()
