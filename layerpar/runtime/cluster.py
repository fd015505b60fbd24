"""Connecting the driver to Ray: a cluster it is pointed at, or a local instance it starts.

    started = connect(cfg)              # True when this call started a local Ray instance
"""

from __future__ import annotations

import logging
import math
import os

import ray

from layerpar.cluster_utils import resolve_address
from layerpar.config import Config


class ClusterError(RuntimeError):
    """The Ray cluster cannot be reached."""


def connect(cfg: Config, *, min_cpus: int = 0) -> bool:
    """Connect to the configured Ray cluster, or start a local one with room for every worker (at
    least `min_cpus` logical CPUs); True when this call started it."""
    if ray.is_initialized():
        return False
    # --address, else RAY_ADDRESS (ray job submit, KubeRay), else "auto" on a `ray up` head node
    address = resolve_address(cfg.parallel.address)
    if address:
        try:
            ray.init(address=address, logging_level=logging.WARNING, log_to_driver=True)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise ClusterError(
                f"cannot reach the Ray cluster at {address!r} ({exc}); start one with "
                "`ray start --head`, or leave parallel.address unset to run on a local Ray instance"
            ) from None
        return True
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # loopback only, see NOTES.md
    # Ray starts workers at niceness 15: the branch workers do the model's work, so they get the
    # same priority as the driver (read by the raylet when it starts).
    os.environ.setdefault("RAY_worker_niceness", "0")
    need = max(min_cpus, math.ceil(cfg.parallel.workers * cfg.parallel.cpus_per_worker))
    ray.init(address="local", num_cpus=max(os.cpu_count() or 1, need), include_dashboard=False,
             logging_level=logging.WARNING)
    return True
