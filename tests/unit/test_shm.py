"""Shared-memory input slots (runtime/shm.py) without Ray: what a worker reads is what the driver
held, slots are reused only once free, grow for larger batches and vanish on close."""

import numpy as np
import pytest
import torch

from layerpar.runtime import shm

pytestmark = [pytest.mark.unit,
              pytest.mark.skipif(not shm.available(), reason="no writable /dev/shm on this host")]


def test_a_held_batch_reads_back_exactly_and_slots_are_reused_grown_and_unlinked():
    slots = shm.InputSlots("layerpar-test")
    a = np.random.default_rng(0).standard_normal((3, 1, 28, 28)).astype(np.float32)
    with slots.hold(a) as ref:
        got = shm.read(ref)
        assert got.dtype == torch.float32 and tuple(got.shape) == a.shape
        assert torch.equal(got, torch.from_numpy(a))
        with slots.hold(a[:1]) as other:  # a second call while the first holds its slot
            assert other.path != ref.path
    with slots.hold(a[:2]) as again:  # both free now: one of them is reused
        assert again.path in (ref.path, other.path)
        assert torch.equal(shm.read(again), torch.from_numpy(a[:2]))
    big = np.arange(300_000, dtype=np.int64)  # 2.4 MB: larger than every slot so far
    with slots.hold(big) as grown:
        assert grown.capacity >= big.nbytes and torch.equal(shm.read(grown), torch.from_numpy(big))
    paths = [s.path for s in slots._all]
    assert len(paths) == 3 and all(p.exists() for p in paths)
    slots.close()
    assert not any(p.exists() for p in paths)
