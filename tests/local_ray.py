"""The one local Ray instance of a test process, whichever tier's fixture asks first (under
`make test` each pytest-xdist worker is its own process with its own Ray).

6 logical CPUs on a 2-core machine: the largest placement a test makes (a 2 x 2 Ray Train mesh, 4
one-CPU ranks) must fit beside what a session-scoped fixture of another tier may still hold on the
same worker (the serve tier's 2-worker engine, 2 x 0.5 CPU). Workers run one torch thread each, so
the logical CPUs only time-share the cores."""

from __future__ import annotations

import logging
import os

import ray

TEST_RAY_CPUS = 6


def start_local_ray() -> bool:
    """ray.init on loopback unless this process already has Ray; True when this call started it."""
    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # loopback only
    os.environ.setdefault("RAY_worker_niceness", "0")  # workers do the work; not behind the driver
    ray.init(address="local", num_cpus=TEST_RAY_CPUS, include_dashboard=False, logging_level=logging.WARNING)
    return True
