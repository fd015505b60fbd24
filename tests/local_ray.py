"""The one local Ray instance of a test process, whichever tier's fixture asks first (under
`make test` each pytest-xdist worker is its own process with its own Ray).

6 logical CPUs on a 2-core machine: the largest placement a test makes (a 2 x 2 Ray Train mesh, 4
one-CPU ranks) must fit beside what a session-scoped fixture of another tier may still hold on the
same worker (the serve tier's 2-worker engine, 2 x 0.5 CPU). Workers run one torch thread each, so
the logical CPUs only time-share the cores.

The test processes of this machine start their Ray instances one at a time (a file lock): under xdist
every worker begins with a Ray file (tests/suite_order.py), and Ray gives a new node a fixed 30 s to
register with its GCS -- four of them starting at once on a busy 2-core machine missed it ("The current
node timed out during startup")."""

from __future__ import annotations

import fcntl
import logging
import os
import tempfile

import ray

TEST_RAY_CPUS = 6


def start_local_ray() -> bool:
    """ray.init on loopback unless this process already has Ray; True when this call started it."""
    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # loopback only
    os.environ.setdefault("RAY_raylet_start_wait_time_s", "120")  # not Ray's 30 s on a busy machine
    os.environ.setdefault("RAY_worker_niceness", "0")  # workers do the work; not behind the driver
    lock = os.path.join(tempfile.gettempdir(), f"layerpar-test-ray-start-{os.getuid()}.lock")
    with open(lock, "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # released when the file closes (or this process dies)
        ray.init(address="local", num_cpus=TEST_RAY_CPUS, include_dashboard=False,
                 logging_level=logging.WARNING)
    return True
