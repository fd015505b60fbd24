"""Fixtures for the serving tests: a real Engine on local Ray (2 branch workers) and a LocalBackend.
Every model here is a real Para-Former; nothing is mocked."""

from __future__ import annotations

import pytest

from tests.local_ray import start_local_ray
from tests.serve.helpers import tiny_cfg


@pytest.fixture(scope="session")
def ray_local():
    import ray

    start_local_ray()  # tests/local_ray.py
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def engine(ray_local):
    """The real Ray Engine with 2 branch workers (branches 0-1 and 2-3), fresh seeded weights."""
    from layerpar.runtime import Engine

    eng = Engine(tiny_cfg(workers=2), total_steps=0, checkpoint=None)
    yield eng
    eng.shutdown()


@pytest.fixture(scope="session")
def local_backend():
    from layerpar.train.local import LocalBackend

    return LocalBackend(tiny_cfg())
