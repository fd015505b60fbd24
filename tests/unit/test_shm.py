"""Shared-memory input slots (runtime/shm.py) without Ray: what a worker reads is what the driver
held, slots are reused only once free, grow for larger batches and vanish on close; they are 0600,
and the slots a killed driver left behind are removed by the next start."""

import os
import signal
import subprocess
import sys
from pathlib import Path

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


def test_slot_files_are_private_to_their_owner():
    slots = shm.InputSlots("layerpar-test")
    try:
        with slots.hold(np.zeros(4, np.float32)) as ref:
            assert os.stat(ref.path).st_mode & 0o777 == 0o600
    finally:
        slots.close()


CHILD = """
import sys, time
import numpy as np
from layerpar.runtime import shm
slots = shm.InputSlots("layerpar-test")
with slots.hold(np.ones(8, np.float32)) as ref:
    print(ref.path, flush=True)
    time.sleep(600)  # killed here, before close()
"""


def test_slots_of_a_killed_driver_are_removed_by_the_next_start():
    proc = subprocess.Popen([sys.executable, "-c", CHILD], stdout=subprocess.PIPE, text=True)
    try:
        left = Path(proc.stdout.readline().strip())
        assert left.name.startswith(f"layerpar-test-{proc.pid}-"), left
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=60) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
    assert left.exists()  # a killed driver leaves its slot behind ...
    live = shm.InputSlots("layerpar-test")  # ... until the next start on this host
    try:
        with live.hold(np.zeros(4, np.float32)) as mine:
            assert not left.exists()
            shm.InputSlots("layerpar-test").close()  # a second start spares a running driver's slots
            assert Path(mine.path).exists()
    finally:
        live.close()
