"""A worker process killed with SIGKILL in the middle of a training run: the run restarts every worker
from its last checkpoint by itself (train.max_failures) and finishes, and -- same seed, deterministic
batch order -- its final weights equal an uninterrupted run's bit for bit.

The kill lands at a fixed place, not at a moment: right before the training step of epoch 2's sixth
batch, from the loop's call to augment() (on the driver, before every step), after the epoch-1
checkpoint is on disk. That step then meets a dead worker, so the restart path provably runs.

    .venv/bin/python -m pytest -q -s tests/faults/test_training_restart.py
"""

from __future__ import annotations

import pytest
import torch

import layerpar.train.loop as loop
from layerpar.runtime import Engine, WorkerError
from layerpar.runtime.restart import run_with_restarts
from layerpar.train.checkpoint import load_checkpoint, model_state
from layerpar.train.loop import run_training
from tests.faults.helpers import fault_cfg, wait_dead

pytestmark = pytest.mark.ray
EPOCHS = 4
KILL_AT = (1, 5)  # (epoch, batch): epoch 2's sixth step, after the epoch-1 checkpoint


def run_cfg(tmp_path, max_failures: int):
    # 480 synthetic images: ~11 batches of 32 per epoch, so the kill lands inside an epoch.
    # long timeouts and heartbeat: on a loaded machine a slow step, evaluation or ping must not count
    # as a second failure (the SIGKILLed worker is noticed by its dead connection at once)
    return fault_cfg(2, f"train.epochs={EPOCHS}", "data.synthetic_size=480",
                     f"train.max_failures={max_failures}", "train.keep_checkpoints=5",
                     f"train.out_dir={tmp_path}", "parallel.timeout_s=60", "parallel.call_timeout_s=60",
                     "parallel.heartbeat_s=30")


def kill_before_step(monkeypatch, chaos, rank: int) -> list[dict]:
    """SIGKILL worker `rank` of the engine training now, once, right before the step at KILL_AT;
    wait until the process is dead. Returns the list the kill is recorded in."""
    others = {w["engine"] for w in chaos.find_workers()}  # engines left by earlier tests
    killed: list[dict] = []
    augment = loop.augment

    def hooked(x, *args, epoch: int, index: int, **kwargs):
        if not killed and (epoch, index) == KILL_AT:
            w = chaos.kill_worker(None, rank, ignore=others)
            wait_dead(w["pid"])
            killed.append(w)
        return augment(x, *args, epoch=epoch, index=index, **kwargs)

    monkeypatch.setattr(loop, "augment", hooked)
    return killed


def test_killed_worker_mid_run_restarts_from_checkpoint_and_ends_bit_identical(
        local_ray, chaos, tmp_path, monkeypatch):
    cfg = run_cfg(tmp_path, max_failures=1)
    # the same driver-fed Engine loop that run_with_restarts runs (backend_factory=Engine), uninterrupted
    clean = run_training(cfg, tmp_path / "clean", progress=False, backend_factory=Engine)
    killed = kill_before_step(monkeypatch, chaos, rank=1)
    result = run_with_restarts(cfg, tmp_path / "chaos", progress=False)
    assert len(killed) == 1  # the kill happened, once
    # the restart path ran: one lost worker, resumed from the epoch-1 checkpoint
    assert result["failures"] == 1, result["restarts"]
    assert result["restarts"][0]["epoch"] == KILL_AT[0] and result["restarts"][0]["checkpoint"]
    assert result["epochs"] == EPOCHS and result["steps"] == clean["steps"]
    want = model_state(load_checkpoint(clean["checkpoint"]))
    got = model_state(load_checkpoint(result["checkpoint"]))
    assert got.keys() == want.keys()
    differ = [name for name, value in want.items() if not torch.equal(got[name], value)]
    assert differ == [], f"not bit-identical to the uninterrupted run: {differ}"
    print(f"\n[training] killed pid {killed[0]['pid']} before step {KILL_AT}; "
          f"restarts={result['restarts']}; final weights bit-identical to the uninterrupted run's")


def test_more_failures_than_allowed_are_raised(local_ray, chaos, tmp_path, monkeypatch):
    cfg = run_cfg(tmp_path, max_failures=0)
    killed = kill_before_step(monkeypatch, chaos, rank=0)
    with pytest.raises(WorkerError, match=r"train.max_failures=0"):
        run_with_restarts(cfg, tmp_path / "run", progress=False)
    assert len(killed) == 1
