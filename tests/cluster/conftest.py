"""Fixtures of the cluster tests: a short private temp root, and a `ray start --head` node on
127.0.0.1 that is stopped by pid (never a global `ray stop`: other Ray instances share the machine)."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest
from cluster_helpers import ray_temp_dir, start_head

from layerpar.cluster_utils import stop_ray_processes


def _private_root() -> Path:
    # Short and under /tmp: Ray's unix sockets live below it and their paths must stay < 108 bytes.
    return Path(tempfile.mkdtemp(prefix="lpc-", dir="/tmp"))


@pytest.fixture
def cluster_root():
    root = _private_root()
    try:
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _head(root: Path):
    """A one-node cluster from `ray start --head` with the dashboard (job API) on a free port."""
    try:
        yield start_head(root, num_cpus=3, dashboard=True)
    finally:
        # by pid: the processes whose command line names this head's temp dir, and their children
        stop_ray_processes(ray_temp_dir(root), grace_s=2)


@pytest.fixture
def ray_head(cluster_root):
    yield from _head(cluster_root)


@pytest.fixture(scope="module")
def module_ray_head():
    """The same head, shared by a module's tests (each must leave it as it found it: no jobs or
    actors left behind, nothing that tests after it would count)."""
    root = _private_root()
    try:
        yield from _head(root)
    finally:
        shutil.rmtree(root, ignore_errors=True)
