"""A worker process killed with SIGKILL in the middle of a training run: the run restarts every worker
from its last checkpoint by itself (train.max_failures) and finishes, and -- same seed, deterministic
batch order -- its final weights equal an uninterrupted run's.

    .venv/bin/python -m pytest -q -s tests/faults/test_training_restart.py
"""

from __future__ import annotations

import pytest
import torch

from layerpar.runtime import WorkerError
from layerpar.train.checkpoint import list_checkpoints, load_checkpoint, model_state
from layerpar.train.loop import run_training
from layerpar.train.restart import run_with_restarts
from tests.faults.helpers import fault_cfg

pytestmark = pytest.mark.ray
EPOCHS = 4


def run_cfg(tmp_path, max_failures: int):
    # 480 synthetic images: ~11 batches of 32 per epoch, so a kill lands inside an epoch
    return fault_cfg(2, f"train.epochs={EPOCHS}", "data.synthetic_size=480",
                     f"train.max_failures={max_failures}", "train.keep_checkpoints=5",
                     f"train.out_dir={tmp_path}")


def test_killed_worker_mid_run_restarts_from_checkpoint_and_ends_equal(local_ray, chaos, tmp_path):
    cfg = run_cfg(tmp_path, max_failures=1)
    clean = run_training(cfg, tmp_path / "clean", progress=False)
    run_dir = tmp_path / "chaos"
    # SIGKILL worker 1 of the run's engine as soon as its first checkpoint (epoch 1) is on disk
    # (engines of other tests in this session, if any, are not the target)
    others = {w["engine"] for w in chaos.find_workers()}
    killer = chaos.kill_when(lambda: len(list_checkpoints(run_dir)) >= 1, rank=1, ignore=others)
    result = run_with_restarts(cfg, run_dir, progress=False)
    killer.join()
    assert killer.error is None and killer.pid is not None
    # Either the run restarted from its checkpoint, or -- when the kill hit an idempotent call right
    # after a save -- the engine restored the worker from that same state in place.
    assert result["failures"] <= 1
    if result["failures"]:
        assert 1 <= result["restarts"][0]["epoch"] < EPOCHS  # resumed mid-run
    assert result["epochs"] == EPOCHS and result["steps"] == clean["steps"]
    want = model_state(load_checkpoint(clean["checkpoint"]))
    got = model_state(load_checkpoint(result["checkpoint"]))
    assert got.keys() == want.keys()
    for name, value in want.items():
        torch.testing.assert_close(got[name], value, atol=1e-6, rtol=0, msg=name)
    print(f"\n[training] killed pid {killer.pid}; failures={result['failures']} "
          f"restarts={result['restarts']}; final weights equal the uninterrupted run's (max diff "
          f"{max((got[k] - v).abs().max().item() for k, v in want.items()):.1e})")


def test_more_failures_than_allowed_are_raised(local_ray, chaos, tmp_path):
    cfg = run_cfg(tmp_path, max_failures=0)
    run_dir = tmp_path / "run"
    others = {w["engine"] for w in chaos.find_workers()}
    killer = chaos.kill_when(lambda: len(list_checkpoints(run_dir)) >= 1, rank=0, ignore=others)
    with pytest.raises(WorkerError, match=r"train.max_failures=0"):
        run_with_restarts(cfg, run_dir, progress=False)
    killer.join()
    assert killer.pid is not None
