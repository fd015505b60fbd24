"""A local Ray instance for the ray tier, shared by the tier's tests and shut down at the end."""

import os

import pytest

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # loopback only

import ray  # noqa: E402 - a hard dependency: a broken install fails the tier, it does not skip it


@pytest.fixture(scope="session")
def local_ray():
    # 4 logical CPUs on a 2-core machine, so 3 one-CPU workers plus the driver fit; a worker uses
    # one thread, so they only time-share the cores.
    started = not ray.is_initialized()
    if started:
        ray.init(address="local", num_cpus=4, include_dashboard=False, logging_level="WARNING")
    yield ray
    if started:
        ray.shutdown()
