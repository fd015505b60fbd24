"""Ray Train tier: a run starts from the checkpoint it announces, on its storage (file:// here).

- an explicit --resume (a file:// URI) of an EARLIER checkpoint of a finished run trains from there and
  ends bit-identical to the uninterrupted run;
- a driver SIGKILLed mid-run, then resumed with --run-dir, starts from the newest complete checkpoint
  on storage and metrics.jsonl holds every epoch exactly once;
- a rank lost after a checkpoint is written but before Ray Train registers it restarts the group from
  that checkpoint (the newest complete one), not from the last registered one;
- a corrupt start checkpoint is refused by the driver before Ray starts: one line naming the file, 2;
- the ranks wait for a checkpoint's publication with train.save_timeout_s, not parallel.timeout_s;
- the command line keeps Ray's chatter off the terminal and in the run's log (the resume above).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from layerpar.train.checkpoint import load_checkpoint
from layerpar.train.loop import cli_main, run_training
from layerpar.train.raytrain import TrainingError
from tests.raytrain.conftest import final_weights, tiny

pytestmark = pytest.mark.ray
ROOT = Path(__file__).resolve().parents[2]
EPOCHS = 3
# 480 synthetic images: 11 batches of 32 per epoch, a checkpoint after every epoch
SETS = [f"train.epochs={EPOCHS}", "data.synthetic_size=480", "train.keep_checkpoints=5",
        "parallel.workers=2"]


def on_storage(store: Path, *sets: str):
    return tiny(*SETS, f"train.storage=file://{store}", *sets)


@pytest.fixture(scope="module")
def clean(local_ray, tmp_path_factory):
    """An uninterrupted 3-epoch run with its checkpoints on file:// storage, and its final weights."""
    base = tmp_path_factory.mktemp("clean")
    result = run_training(on_storage(base / "store"), base / "local" / "run", progress=False)
    return {"result": result, "store": base / "store", "weights": final_weights(result)}


def assert_same_weights(result, want: dict) -> None:
    got = final_weights(result)
    assert got.keys() == want.keys()
    for name, value in want.items():
        assert torch.equal(got[name], value), name


def epochs_in(run_dir: Path) -> list[int]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(s)["epoch"] for s in lines]


def test_resume_from_an_earlier_checkpoint_by_uri(clean, tmp_path):
    """`--resume file://STORE/run/checkpoints/step_0000011` of the finished run: the ranks start from
    step 11 (not from the run's newest, 33) and end at the uninterrupted run's bits."""
    store = tmp_path / "store"
    shutil.copytree(clean["store"], store)  # the clean run's storage, resumed here
    start = store / "run" / "checkpoints" / "step_0000011"
    run_dir = tmp_path / "local" / "run"
    ckpts = store / "run" / "checkpoints"
    before = (ckpts / "step_0000033" / "manifest.json").read_text()
    result = run_training(on_storage(store), run_dir, resume=f"file://{start}", progress=False)
    assert (ckpts / "step_0000033" / "manifest.json").read_text() != before  # trained again: written anew
    assert result["started_from"] == str(start)
    assert result["steps"] == 33 and result["epochs"] == EPOCHS and result["failures"] == 0
    assert_same_weights(result, clean["weights"])
    # the abandoned history moved aside; the new one is the run's checkpoints now
    assert sorted(p.name for p in (next(ckpts.glob("superseded-*"))).iterdir()) == ["step_0000022",
                                                                                    "step_0000033"]
    assert load_checkpoint(ckpts / "step_0000033").manifest["extra"]["attempt"] is not None
    assert epochs_in(run_dir) == [1, 2, 3]


def test_driver_killed_then_run_dir_resume(clean, tmp_path):
    """SIGKILL the driver once the epoch-1 checkpoint is on storage; `--run-dir` then starts from the
    newest complete checkpoint on storage, as it announces, and every epoch is in metrics.jsonl once;
    Ray's chatter stays off its terminal."""
    store, run_dir = tmp_path / "store", tmp_path / "local" / "run"
    sets = [f"--set={s}" for s in [*SETS, f"train.storage=file://{store}", "parallel.timeout_s=60"]]
    cmd = [sys.executable, str(ROOT / "launch" / "train.py"), "--config", "tiny", *sets,
           "--run-dir", str(run_dir), "--quiet"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    first = store / "run" / "checkpoints" / "step_0000011" / "manifest.json"
    try:
        deadline = time.monotonic() + 300
        while not first.exists():
            assert proc.poll() is None, "the run ended before its first checkpoint"
            assert time.monotonic() < deadline, "no checkpoint within 300 s"
            time.sleep(0.05)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # the driver and the local Ray it started
        except ProcessLookupError:
            pass
        proc.wait(timeout=60)
    from layerpar.train.shard_checkpoint import open_storage, stored_checkpoints

    newest = stored_checkpoints(*open_storage(str(store / "run")))[-1]
    # the resume is the demo's path too (launch/train.py on 2 Ray Train workers): no Ray actor output,
    # Ray Train report dumps or tracebacks on the terminal; they go to Ray's logs, named in ray.log
    env = {k: v for k, v in os.environ.items() if k != "RAY_LOG_TO_DRIVER"}
    out = subprocess.run([a for a in cmd if a != "--quiet"], cwd=ROOT, capture_output=True, text=True,
                         timeout=600, env={**env, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    for chatter in ("PlacementGroupCleaner", "Failed to query", "Reporting training result", "Traceback",
                    "TrainController", "RayTrainWorker"):
        assert chatter not in out.stdout + out.stderr, chatter
    log = run_dir / "ray.log"
    assert log.is_file() and f"Ray's log: {log}" in out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["run_dir"] == str(run_dir)
    assert result["started_from"] == newest  # the one announced: the newest complete on storage
    assert epochs_in(run_dir) == [1, 2, 3]  # each epoch exactly once
    assert_same_weights(result, clean["weights"])


def test_restart_takes_the_newest_complete_checkpoint(clean, tmp_path, monkeypatch):
    """Rank 1 dies once the epoch-1 checkpoint is written, before Ray Train registers it: the group
    restarts from it (Ray Train's last registered checkpoint is the start of the run)."""
    monkeypatch.setenv("LAYERPAR_CHAOS_KILL", "epoch=1,rank=1,when=saved")
    store, run_dir = tmp_path / "store", tmp_path / "local" / "run"
    result = run_training(on_storage(store, "train.max_failures=1"), run_dir, progress=False)
    assert len(result["chaos_kills"]) == 1 and result["failures"] == 1
    assert result["restarts"][0]["checkpoint"] == str(store / "run" / "checkpoints" / "step_0000011")
    assert epochs_in(run_dir) == [1, 2, 3]
    assert_same_weights(result, clean["weights"])


def test_corrupt_start_checkpoint_is_refused_before_ray(local_ray, tmp_path, capsys):
    """A damaged file in the start checkpoint: one line naming it, exit 2, and no Ray Train run (with
    train.max_failures=2 nothing is retried)."""
    one = run_training(tiny("train.epochs=1", "data.synthetic_size=160", "parallel.workers=0"),
                       tmp_path / "one", progress=False)
    bad = Path(one["checkpoint"]) / "branch_001.safetensors"
    data = bytearray(bad.read_bytes())
    data[-1] ^= 0xFF
    bad.write_bytes(bytes(data))
    capsys.readouterr()
    code = cli_main(["--config", "tiny", "--set", "parallel.workers=2", "--set", "train.max_failures=2",
                     "--set", "train.epochs=2", "--set", "data.synthetic_size=160",
                     "--resume", one["checkpoint"], "--run-dir", str(tmp_path / "two")])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.splitlines() == [f"error: {bad}: sha256 does not match the manifest (the file is "
                                f"corrupted or truncated)"]


def test_save_waits_with_its_own_bound(local_ray, tmp_path, monkeypatch):
    """Rank 0 takes long to publish the checkpoint: the other rank waits train.save_timeout_s for it
    (here 2 s) and the run fails naming that bound, not after parallel.timeout_s (60 s)."""
    monkeypatch.setenv("LAYERPAR_CHAOS_SLOW_PUBLISH", "300")
    cfg = tiny("train.epochs=1", "data.synthetic_size=160", "parallel.workers=2",
               f"train.storage=file://{tmp_path / 'store'}", "train.save_timeout_s=2")
    t0 = time.monotonic()
    with pytest.raises(TrainingError, match=r"was not published within train.save_timeout_s=2 s") as info:
        run_training(cfg, tmp_path / "run", progress=False)
    assert "\n" not in str(info.value)
    assert time.monotonic() - t0 < 300  # it did not wait for rank 0's slow publish


def test_watcher_stop_does_not_poll_beside_a_late_poll(local_ray, tmp_path):
    """Watcher.stop after a join that timed out (a ProgressLog answering slowly) must not take the
    same events a second time beside the poll still running: one start event is one group."""
    import ray

    from layerpar.train.raytrain import Watcher

    @ray.remote(num_cpus=0, max_concurrency=4)
    class SlowLog:
        def __init__(self):
            self.calls = 0
            self.events = [{"kind": "start", "rank": 0, "pid": 1, "restored": None, "epoch": 0, "step": 0,
                            "node": "n"}]

        def since(self, index):
            self.calls += 1
            if self.calls == 1:
                time.sleep(12)  # longer than stop()'s join (10 s)
            return self.events[index:]

        def called(self):
            return self.calls

    log, said = SlowLog.remote(), []
    watcher = Watcher(log, tmp_path / "metrics.jsonl", bar=None, say=said.append)
    watcher.start()
    deadline = time.monotonic() + 120
    while ray.get(log.called.remote()) == 0:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    watcher.stop()
    watcher.join(timeout=60)
    assert watcher.groups == 1 and watcher.restarts == [] and said == []
    ray.kill(log)
