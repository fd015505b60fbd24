"""Shared test fixtures, kept minimal. Tier-specific fixtures (local Ray, gloo groups) live beside
their tests."""

import os

import pytest

# Ray listens on loopback only and its CLI clients send the auth token (docs/CLUSTER.md): set before
# any test imports ray, in this process and every process it starts.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_AUTH_MODE", "token")


@pytest.fixture
def tiny_cfg():
    """The packaged `tiny` config: a 4-branch width-16 Para-Former on synthetic data, 1 thread."""
    from layerpar.config import load_config

    return load_config("tiny")


@pytest.fixture
def one_thread():
    """Workers run one torch thread; a reference model compared with them bit for bit must add its
    floats the same way."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
