"""A checkpoint save killed with SIGKILL part-way leaves the previous checkpoint loadable and verified,
and the next save succeeds and sweeps up the half-written temp directory.

A child process writes checkpoint 1, then starts checkpoint 2 and stops for good at a chosen point
(a patched write or rename that signals and sleeps); the test SIGKILLs it there.

    .venv/bin/python -m pytest -q tests/faults/test_checkpoint_crash.py
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

from layerpar.config import load_config
from layerpar.model import ParaFormer
from layerpar.train.checkpoint import (
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    model_state,
    save_checkpoint,
    split_pieces,
)

pytestmark = pytest.mark.unit

CHILD = textwrap.dedent("""
    import os, sys, time
    from pathlib import Path
    import torch
    from layerpar.config import load_config
    from layerpar.model import ParaFormer
    from layerpar.train import checkpoint as C

    target, point = Path(sys.argv[1]), sys.argv[2]
    cfg = load_config("tiny")
    model = ParaFormer(cfg.model, seed=0)
    C.save_checkpoint(target, C.split_pieces(model.state_dict()), config=cfg, step=1, epoch=1)

    def stop():  # the parent kills us here
        print("stopped", flush=True)
        time.sleep(600)

    if point == "first_piece":  # after the first file of checkpoint 2 is written and synced
        write = C._write_file
        C._write_file = lambda path, data: (write(path, data), stop())
    elif point == "before_rename":  # every file and the manifest written, not yet renamed into place
        C._replace_dir = lambda tmp, final: stop()
    elif point == "mid_replace":  # overwriting a checkpoint dir: the old one moved aside, new not in
        rename = os.rename
        def rename_then_stop(src, dst):
            rename(src, dst)
            if "old-" in str(dst):
                stop()
        C.os.rename = rename_then_stop
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    step = 1 if point == "mid_replace" else 2  # mid_replace: the same checkpoint dir again
    C.save_checkpoint(target, C.split_pieces(model.state_dict()), config=cfg, step=step, epoch=2)
    print("finished", flush=True)
""")


def crash_during_save(target, point: str) -> None:
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(target), point], stdout=subprocess.PIPE,
                            text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        line = proc.stdout.readline().strip()
        assert line == "stopped", f"the child did not reach {point!r}: {line!r}"
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()


def first_weights():
    cfg = load_config("tiny")
    return cfg, ParaFormer(cfg.model, seed=0).state_dict()


@pytest.mark.parametrize("point", ["first_piece", "before_rename"])
def test_killed_save_leaves_the_previous_checkpoint(tmp_path, point):
    run = tmp_path / "run"
    run.mkdir()
    crash_during_save(run, point)
    cfg, weights = first_weights()
    assert [p.name for p in list_checkpoints(run)] == ["step_0000001"]
    ckpt = load_checkpoint(run)  # every file's sha256 is verified on the way
    assert ckpt.step == 1
    got = model_state(ckpt)
    assert all(torch.equal(got[k], v) for k, v in weights.items())
    leftovers = [p.name for p in (run / "checkpoints").iterdir() if p.name.startswith(".tmp-")]
    assert leftovers, "the killed save should have left its temp dir (and nothing else)"
    # the next save works and sweeps up the leftovers
    save_checkpoint(run, split_pieces(weights), config=cfg, step=2, epoch=2)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_0000001", "step_0000002"]
    assert latest_checkpoint(run).name == "step_0000002"


def test_killed_overwrite_of_a_checkpoint_dir_keeps_a_loadable_one(tmp_path):
    target = tmp_path / "ckpt"  # an explicit checkpoint directory, saved over in place
    crash_during_save(target, "mid_replace")
    _, weights = first_weights()
    ckpt = load_checkpoint(target)
    assert all(torch.equal(model_state(ckpt)[k], v) for k, v in weights.items())
