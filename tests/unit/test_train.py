"""Training: progressive steps touch only their prefix; the loop is deterministic; resuming from a
checkpoint (at an epoch boundary or mid-epoch) ends at the same weights as an uninterrupted run."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from layerpar.model import ParaFormer
from layerpar.runtime.backend import make_backend
from layerpar.train.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint, model_state
from layerpar.train.evaluate import evaluate
from layerpar.train.local import LocalBackend
from layerpar.train.loop import run_training

pytestmark = pytest.mark.unit
ROOT = Path(__file__).resolve().parents[2]


def final_weights(result) -> dict[str, torch.Tensor]:
    return model_state(load_checkpoint(result["checkpoint"]))


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_progressive_first_step_leaves_later_branches_untouched(tiny_cfg):
    cfg = tiny_cfg.replace(train={"mode": "progressive"})
    backend = LocalBackend(cfg, total_steps=50)
    seen = []

    def after_step(opt, args, kwargs):  # runs after every optimizer step of the batch
        grads = {n: p.grad is not None for n, p in backend.model.named_parameters()}
        state = {n: p in opt.state and bool(opt.state[p]) for n, p in backend.model.named_parameters()}
        seen.append((grads, state))

    backend.opt.register_step_post_hook(after_step)
    before = backend.state_dict()
    out = backend.train_step(torch.randn(8, 1, 8, 8), torch.randint(0, 4, (8,)))
    assert out["step"] == 5 and len(out["prefix_losses"]) == 4  # k = 1..4, then the joint step
    assert len(seen) == 5
    grads, state = seen[0]  # step 1: the prefix model of branch 0 alone
    for name in grads:
        in_prefix = not name.startswith("branches.") or name.startswith("branches.0.")
        assert grads[name] is in_prefix, name  # None (not zero) beyond the prefix
        assert state[name] is in_prefix, name  # so AdamW holds no state for them either
    grads, state = seen[2]  # step 3: branches 0..2
    assert grads["branches.2.blocks.0.qkv_w"] and not grads["branches.3.blocks.0.qkv_w"]
    assert all(seen[4][0].values()) and all(seen[4][1].values())  # the joint step reaches all
    after = backend.state_dict()
    assert not torch.equal(before["branches.3.blocks.0.fc1_w"], after["branches.3.blocks.0.fc1_w"])


def test_backend_prefix_logits_and_evaluate(tiny_cfg):
    from layerpar.data import load_dataset

    splits = load_dataset(tiny_cfg)
    with make_backend(tiny_cfg, total_steps=10) as backend:
        assert isinstance(backend, LocalBackend)
        x, _ = splits.test.take(slice(0, 5))
        prefixes = backend.prefix_logits(x)
        assert prefixes.shape == (4, 5, 4)
        for k in range(1, 5):
            torch.testing.assert_close(prefixes[k - 1], backend.infer(x, k), atol=1e-6, rtol=0)
        m = evaluate(backend, splits.test, batch_size=7)
        assert len(m["prefix_accuracy"]) == 4 and m["accuracy"] == m["prefix_accuracy"][-1]
        assert m["samples"] == len(splits.test.y)
        info = backend.info()
        assert (info["workers"], info["num_branches"]) == (0, 4)
        assert info["params"] == sum(p.numel() for p in ParaFormer(tiny_cfg.model).parameters())
    vit = LocalBackend(tiny_cfg.replace(model={"kind": "vit"}))
    assert vit.prefix_logits(x).shape == (1, 5, 4)
    assert len(evaluate(vit, splits.test)["prefix_accuracy"]) == 1


def test_run_training_writes_a_run(tmp_path, tiny_cfg):
    cfg = tiny_cfg.replace(train={"out_dir": str(tmp_path / "runs"), "epochs": 3, "keep_checkpoints": 2})
    result = run_training(cfg, progress=False)
    run_dir = Path(result["run_dir"])
    assert run_dir.parent == tmp_path / "runs"
    for key in ("run_dir", "test_accuracy", "val_accuracy", "prefix_accuracy", "train_seconds", "params",
                "workers", "transport", "epochs", "steps"):
        assert key in result, key
    assert (result["epochs"], result["workers"], result["transport"]) == (3, 0, "local")
    assert len(result["prefix_accuracy"]) == 4 and result["test_accuracy"] == result["prefix_accuracy"][-1]
    lines = [json.loads(s) for s in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines] == [1, 2, 3]
    assert {"epoch", "step", "train_loss", "val_accuracy", "lr", "seconds"} <= set(lines[0])
    assert lines[-1]["step"] == result["steps"] == 3 * 4  # 4 batches of 32 per epoch
    assert len(list_checkpoints(run_dir)) == 2 and latest_checkpoint(run_dir) == Path(result["checkpoint"])
    from layerpar.config import load_config

    assert load_config(run_dir / "config.yaml") == cfg
    assert json.loads((run_dir / "result.json").read_text()) == result


@pytest.mark.parametrize("mode", ["joint", "progressive"])
def test_resume_at_epoch_boundary_matches_uninterrupted(tmp_path, tiny_cfg, mode):
    cfg = tiny_cfg.replace(train={"mode": mode, "epochs": 2, "keep_checkpoints": 5})
    full = run_training(cfg, tmp_path / "full", progress=False)
    # the interrupted run: it got as far as its epoch-1 checkpoint, then restarts in its run dir
    first, last = list_checkpoints(tmp_path / "full")
    part = tmp_path / "part" / "checkpoints"
    part.mkdir(parents=True)
    shutil.copytree(first, part / first.name)
    resumed = run_training(cfg, tmp_path / "part", progress=False)
    assert resumed["steps"] == full["steps"] and resumed["epochs"] == 2
    assert_same_weights(final_weights(resumed), final_weights(full))
    assert resumed["test_accuracy"] == full["test_accuracy"]
    assert load_checkpoint(resumed["checkpoint"]).optim.keys() == load_checkpoint(last).optim.keys()


def test_resume_mid_epoch_after_time_budget(tmp_path, tiny_cfg):
    cfg = tiny_cfg.replace(train={"epochs": 2})
    full = run_training(cfg, tmp_path / "full", progress=False)
    # a budget that is spent after the first batch: the run stops mid-epoch and says where
    stopped = run_training(cfg.replace(train={"max_minutes": 1e-9}), tmp_path / "part", progress=False)
    assert stopped["stopped_early"] and stopped["steps"] == 1 and stopped["epochs"] == 0
    extra = load_checkpoint(stopped["checkpoint"]).manifest["extra"]
    assert extra["epoch_batches"] == 1
    resumed = run_training(cfg, tmp_path / "part", progress=False)
    assert not resumed["stopped_early"] and resumed["steps"] == full["steps"]
    assert_same_weights(final_weights(resumed), final_weights(full))


def test_resume_path_continues_in_its_run_dir(tmp_path, tiny_cfg):
    cfg = tiny_cfg.replace(train={"epochs": 1})
    first = run_training(cfg, tmp_path / "run", progress=False)
    again = run_training(cfg.replace(train={"epochs": 2}), resume=first["checkpoint"], progress=False)
    assert again["run_dir"] == first["run_dir"] and again["epochs"] == 2


def test_resume_from_an_earlier_checkpoint_starts_a_new_history(tmp_path, tiny_cfg):
    """--resume of the epoch-1 checkpoint of a finished 3-epoch run (one process): it trains epochs 2
    and 3 again to the same bits, the newer checkpoints move aside, metrics.jsonl has each epoch once."""
    cfg = tiny_cfg.replace(train={"epochs": 3, "keep_checkpoints": 5})
    full = run_training(cfg, tmp_path / "run", progress=False)
    want = final_weights(full)
    first = list_checkpoints(tmp_path / "run")[0]
    again = run_training(cfg, resume=f"file://{first}", progress=False)  # a storage URI as well
    assert again["run_dir"] == full["run_dir"] and again["steps"] == full["steps"]
    assert_same_weights(final_weights(again), want)
    (aside,) = (tmp_path / "run" / "checkpoints").glob("superseded-*")
    assert len(list(aside.iterdir())) == 2  # the abandoned history's epoch-2 and epoch-3 checkpoints
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(s)["epoch"] for s in lines] == [1, 2, 3]


def test_training_is_deterministic(tmp_path, tiny_cfg):
    a = run_training(tiny_cfg, tmp_path / "a", progress=False)
    b = run_training(tiny_cfg, tmp_path / "b", progress=False)
    assert_same_weights(final_weights(a), final_weights(b))
    assert a["prefix_accuracy"] == b["prefix_accuracy"]


def _launch(*args, cwd):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, str(ROOT / "launch" / "train.py"), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def test_launch_script_prints_json_last(tmp_path):
    proc = _launch("--config", "tiny", "--out-dir", str(tmp_path / "runs"), "--set", "train.epochs=1",
                   cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert Path(result["run_dir"]).parent == tmp_path / "runs" and result["epochs"] == 1


@pytest.mark.parametrize("args,words", [
    (["--config", "tiny", "--set", "model.heads=3"], "model.dim (16) must be divisible by model.heads (3)"),
    (["--config", "nope.yaml"], "does not exist"),
    (["--config", "tiny", "--resume", "/nonexistent/run"], "does not exist"),
    (["--config", "tiny", "--set", "data.name=fashion_mnist", "--set", "data.root=/nonexistent"],
     "Fashion-MNIST not found"),
])
def test_launch_script_errors_are_one_line(tmp_path, args, words):
    proc = _launch(*args, "--out-dir", str(tmp_path / "runs"), cwd=tmp_path)
    assert proc.returncode == 2
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and words in err[0], proc.stderr
    assert not (tmp_path / "runs").exists()  # nothing written for a run that never started


def test_resumed_run_counts_earlier_time_in_total_seconds(tmp_path, tiny_cfg):
    # A run stopped after one batch, whose checkpoint says 1000 s were trained before (an old
    # checkpoint: train_seconds only). The resumed run's total wall time must include them too:
    # total_seconds < train_seconds was the inconsistency (issue 14).
    cfg = tiny_cfg.replace(train={"epochs": 2})
    stopped = run_training(cfg.replace(train={"max_minutes": 1e-9}), tmp_path / "part", progress=False)
    manifest_file = Path(stopped["checkpoint"]) / "manifest.json"
    manifest = json.loads(manifest_file.read_text())
    assert manifest["extra"]["total_seconds"] >= manifest["extra"]["train_seconds"]
    manifest["extra"] = {**manifest["extra"], "train_seconds": 1000.0}
    del manifest["extra"]["total_seconds"]
    manifest_file.write_text(json.dumps(manifest))  # the manifest is not hashed; its files are
    resumed = run_training(cfg, tmp_path / "part", progress=False)
    assert resumed["train_seconds"] >= 1000.0
    assert resumed["total_seconds"] >= resumed["train_seconds"]
    assert json.loads((tmp_path / "part" / "result.json").read_text())["total_seconds"] == \
        resumed["total_seconds"]


def test_one_process_is_the_rank_loop_on_a_world_of_one(tmp_path, tiny_cfg):
    """parallel.workers=0 runs the loop every Ray Train rank runs (rank_loop.run_rank): one rank's
    step-time split, and checkpoints stamped and carrying their history as a rank writes them."""
    result = run_training(tiny_cfg.replace(train={"epochs": 1, "mode": "joint"}), tmp_path / "r",
                          progress=False)
    assert result["trainer"] == "local" and result["workers"] == 0
    assert len(result["phases"]) == 1 and result["phases"][0]["steps"] == result["steps"]
    extra = load_checkpoint(result["checkpoint"]).manifest["extra"]
    assert extra["attempt"].startswith("local-") and [r["epoch"] for r in extra["metrics"]] == [1]


def test_one_place_decides_saving_and_the_time_budget():
    """grep: train.checkpoint_every and train.max_minutes are read in the one loop only (the local
    host's log line names max_minutes, it decides nothing)."""
    train = ROOT / "layerpar" / "train"
    for field in ("checkpoint_every", "max_minutes * 60"):
        readers = sorted(p.name for p in train.glob("*.py") if field in p.read_text())
        assert readers == ["rank_loop.py"], (field, readers)


class _QuietHost:  # the loop's events, dropped (a world of one with no bar or metrics file)
    def started(self, event): pass
    def step(self, event): pass
    def epoch(self, record, path, saved): pass
    def final(self, record): pass


def _rank_run(cfg, run_dir: Path, attempt: str):
    """The world-of-one rank run of loop._one_process, with the attempt stamp chosen here."""
    import pyarrow.fs as pafs

    from layerpar.data import load_dataset
    from layerpar.train.rank_loop import RankRun
    from layerpar.train.shard import BranchShard, TimedComm

    shard = BranchShard(cfg, worker_rank=0, total_steps=100)
    return RankRun(cfg, {"start": None, "attempt": attempt}, _QuietHost(), shard=shard,
                   comm=TimedComm(shard.comms[1]), splits=load_dataset(cfg),
                   fs=pafs.LocalFileSystem(), root=str(run_dir.resolve()))


def test_a_restart_of_the_same_attempt_keeps_the_time_budget_it_spent(tmp_path, tiny_cfg):
    """train.max_minutes bounds one invocation: a group that Ray Train restarts from a checkpoint of
    its own attempt has spent part of the budget already (it used to get the whole budget again)."""
    from layerpar.train.rank_loop import run_rank

    cfg = tiny_cfg.replace(train={"epochs": 1})
    first = run_rank(_rank_run(cfg, tmp_path / "run", "attempt-a"))
    spent = load_checkpoint(first["checkpoint"]).manifest["extra"]["attempt_train_seconds"]
    assert spent > 0
    budget = cfg.replace(train={"epochs": 3, "max_minutes": spent / 60.0 / 2})  # half of what it spent
    restarted = _rank_run(budget, tmp_path / "run", "attempt-a")  # restart_point: the attempt's own
    assert restarted.spent == spent
    final = run_rank(restarted)
    assert final["stopped_early"] and final["steps"] == first["steps"] + 1  # stopped after one batch
    assert _rank_run(budget, tmp_path / "run", "attempt-b").spent == 0.0  # a new invocation: a new budget
