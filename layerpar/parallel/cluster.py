"""Connecting the driver to Ray: a cluster it is pointed at, or a local instance it starts.

    started = connect(cfg)              # True when this call initialised Ray in this process

A run joins a cluster only when told to (parallel.address / --address, RAY_ADDRESS) or when this node
is the running, reachable head of a `ray up` cluster (`ray submit`). A `~/ray_bootstrap_config.yaml`
left by `ray up` + `ray down` is not a cluster: the run starts its local Ray and says so on stderr.
"""

from __future__ import annotations

import logging
import math
import os
import sys

import ray

from layerpar.cluster_utils import choose_address, host_port, reachable
from layerpar.config import Config
from layerpar.config_rules import ConfigError


class ClusterError(ConfigError, RuntimeError):
    """The Ray cluster the run was pointed at cannot be reached. A ConfigError, so that the CLIs
    report it as one sentence and exit 2 (parallel.address or RAY_ADDRESS names no cluster)."""


def _source(cfg: Config) -> str:
    if cfg.parallel.address:
        return "parallel.address"
    return "RAY_ADDRESS" if os.environ.get("RAY_ADDRESS") else "the `ray up` head on this node"


def _unreachable(address: str, why: str, source: str) -> ClusterError:
    fix = (f"start it (`ray start --head`) or unset {source} to run on a local Ray instance"
           if source in ("parallel.address", "RAY_ADDRESS") else "check `ray status` on this node")
    return ClusterError(f"cannot reach the Ray cluster at {address!r} (from {source}): {why}; {fix}")


def _join(cfg: Config, address: str) -> None:
    """ray.init on a running cluster, checked first so that a dead address fails in seconds."""
    source = _source(cfg)
    if address == "auto":
        from ray._private.services import canonicalize_bootstrap_address

        try:
            found = canonicalize_bootstrap_address("auto")
        except (ConnectionError, ValueError) as exc:
            raise _unreachable(address, str(exc).splitlines()[0].rstrip("."), source) from None
        if not found:
            raise _unreachable(address, "no running Ray instance was found on this machine", source)
        address = found
    if host_port(address) and not reachable(address):
        raise _unreachable(address, "nothing accepts connections there", source)
    try:
        ray.init(address=address, logging_level=logging.WARNING, log_to_driver=True)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0].rstrip(".")
        raise _unreachable(address, first, source) from None


def connect(cfg: Config, *, min_cpus: int = 0) -> bool:
    """Connect to the configured Ray cluster, or start a local one with room for every worker (at
    least `min_cpus` logical CPUs); True when this call initialised Ray (the caller shuts it down)."""
    if ray.is_initialized():
        return False
    address, note = choose_address(cfg.parallel.address)
    if note:
        print(note, file=sys.stderr, flush=True)
    if address:
        _join(cfg, address)
        return True
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # else Ray binds the external NIC
    # Ray starts workers at niceness 15: the branch workers do the model's work, so they get the
    # same priority as the driver (read by the raylet when it starts).
    os.environ.setdefault("RAY_worker_niceness", "0")
    p = cfg.parallel
    need = max(min_cpus, math.ceil(p.workers * p.replicas * p.cpus_per_worker))
    ray.init(address="local", num_cpus=max(os.cpu_count() or 1, need), include_dashboard=False,
             logging_level=logging.WARNING)
    return True
