"""Training a language model on the one loop, in one process (train/lm_shard.py, lm_step.py,
data/text.py's TextSplit, train/lm_checkpoint.load_lm): the step equals plain autograd, the loop's
records carry bits per byte, a resumed run equals an uninterrupted one, `launch/train.py --config
stdlib_lm` writes a checkpoint load_lm loads, and bad config values get one sentence."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from layerpar.config import ConfigError, load_config
from layerpar.data import load_dataset
from layerpar.data.text import TextSplit, window_starts
from layerpar.model.lm import ParaFormerLM, SerialLM, build_lm, generate
from layerpar.train.checkpoint import CheckpointError, load_checkpoint, model_state
from layerpar.train.lm_checkpoint import load_lm
from layerpar.train.lm_shard import LMShard, lm_optimizer
from layerpar.train.loop import run_training
from layerpar.train.optim import lr_at, set_lr

pytestmark = pytest.mark.unit
ROOT = Path(__file__).resolve().parents[2]
TINY = ["model.kind=paraformer_lm", "data.name=text", "model.context=16", "model.dim=16", "model.heads=2",
        "model.mlp_dim=32", "model.num_branches=3", "model.branch_depth=1", "train.batch_size=4",
        "train.threads=1", "data.eval_windows=8"]


@pytest.fixture
def corpus(tmp_path):
    """A directory of a dozen small text files (the default corpus, the stdlib, is slower to read)."""
    root = tmp_path / "corpus"
    root.mkdir()
    for i in range(12):
        text = "".join(f"def f{i}_{j}(x):\n    return x * {j}\n" for j in range(8))
        (root / f"f{i:02d}.txt").write_text(text)
    return root


def tiny(corpus, tmp_path, *sets):
    return load_config(None, [*TINY, f"data.root={corpus}", f"train.out_dir={tmp_path / 'runs'}", *sets])


@pytest.mark.parametrize("kind,mode", [("paraformer_lm", "joint"), ("serial_lm", "joint")])
def test_step_equals_plain_autograd(kind, mode):
    """The shard's step (the tied head's gradient kept apart, then added) is the plain autograd of the
    mean next-token loss, clipped, through AdamW: float64 to 1e-10 after 3 steps."""
    cfg = load_config(None, [*TINY, f"model.kind={kind}", "model.dtype=float64", "train.lr=3e-3",
                             "train.grad_clip=0.5"])
    shard = LMShard(cfg, worker_rank=0, total_steps=10)
    model = build_lm(cfg.model, seed=cfg.train.seed)
    opt = lm_optimizer(model, cfg.train)
    g = torch.Generator().manual_seed(0)
    for step in range(3):
        w = torch.randint(0, 259, (4, 17), generator=g)
        out = shard.train_step(w[:, :-1], w[:, 1:])
        set_lr(opt, lr_at(step, 10, cfg.train))
        opt.zero_grad()
        loss = F.cross_entropy(model(w[:, :-1]).reshape(-1, 259), w[:, 1:].reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
        opt.step()
        assert out["loss"] == pytest.approx(loss.item(), abs=1e-12)
    for name, value in model.state_dict().items():
        torch.testing.assert_close(shard.model.state_dict()[name], value, atol=1e-10, rtol=0)
    assert isinstance(shard.model, ParaFormerLM if kind == "paraformer_lm" else SerialLM)


def test_progressive_steps_every_prefix():
    cfg = load_config(None, [*TINY, "train.mode=progressive", "model.dtype=float64"])
    shard = LMShard(cfg, worker_rank=0, total_steps=8)
    w = torch.randint(0, 259, (4, 17), generator=torch.Generator().manual_seed(1))
    before = {k: v.clone() for k, v in shard.model.state_dict().items()}
    out = shard.train_step(w[:, :-1], w[:, 1:])
    assert out["step"] == 4 and len(out["prefix_losses"]) == 3  # k = 1, 2, 3, then the joint step
    assert all(not torch.equal(before[k], v) for k, v in shard.model.state_dict().items() if "branches" in k)


def test_text_split_windows(corpus):
    cfg = load_config(None, [*TINY, f"data.root={corpus}", "data.limit_train=5"])
    splits = load_dataset(cfg)
    assert isinstance(splits.train, TextSplit) and len(splits.train) == 5 and len(splits.val) >= 1
    x, y = splits.train.take(torch.tensor([0, 3]))
    assert x.shape == y.shape == (2, 16) and x.dtype == torch.int64 and torch.equal(x[:, 1:], y[:, :-1])
    tokens = torch.arange(200, dtype=torch.int16)
    assert window_starts(tokens, 16).tolist() == [16 * i for i in range(12)]
    assert window_starts(tokens, 16, keep=3, spread=True).tolist() == [0, 96, 176]
    seeded = window_starts(tokens, 16, keep=3, seed=1).tolist()
    assert seeded == sorted(seeded) and len(set(seeded)) == 3 and seeded == window_starts(tokens, 16, keep=3,
                                                                                           seed=1).tolist()


def test_loop_records_bits_per_byte_and_resume_equals_straight_run(corpus, tmp_path):
    """Joint training through run_training: the epoch records and the result carry bits per byte of
    every prefix (equal to the loaded model's own loss), and a run resumed from the epoch-1
    checkpoint ends at the uninterrupted run's weights."""
    cfg = tiny(corpus, tmp_path, "train.epochs=2", "model.dtype=float64")
    straight = run_training(cfg, tmp_path / "straight", progress=False)
    lines = [json.loads(s) for s in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines] == [1, 2]
    assert len(lines[-1]["val_prefix_bits_per_byte"]) == 3
    assert lines[-1]["val_bits_per_byte"] == lines[-1]["val_prefix_bits_per_byte"][-1]
    assert lines[-1]["val_bits_per_byte"] < lines[0]["val_bits_per_byte"] < 8.5
    assert straight["test_bits_per_byte"] > 0 and len(straight["test_prefix_bits_per_byte"]) == 3
    # the bits per byte of the test split, recomputed from the checkpoint with load_lm
    model, got_cfg = load_lm(straight["run_dir"])
    split = load_dataset(got_cfg).test
    x, y = split.take(slice(0, len(split)))
    with torch.no_grad():
        nll = F.cross_entropy(model(x).reshape(-1, 259), y.reshape(-1), reduction="sum").item()
    assert straight["test_bits_per_byte"] == pytest.approx(nll / math.log(2) / int((y < 256).sum()), rel=1e-9)
    # resume from the straight run's epoch-1 checkpoint (weights, AdamW state, schedule position)
    epoch1 = sorted((tmp_path / "straight" / "checkpoints").glob("step_*"))[0]
    resumed = run_training(cfg, tmp_path / "resumed", resume=epoch1, progress=False)
    assert resumed["steps"] == straight["steps"]
    a, b = (model_state(load_checkpoint(r["checkpoint"])) for r in (straight, resumed))
    for name in a:
        torch.testing.assert_close(b[name], a[name], atol=1e-12, rtol=0)


def test_cli_stdlib_lm_writes_a_checkpoint_load_lm_loads(tmp_path):
    """The packaged config at a tiny size, through launch/train.py, on the default corpus."""
    sets = ["model.context=16", "model.dim=16", "model.heads=2", "model.mlp_dim=32", "model.num_branches=2",
            "data.limit_train=16", "data.eval_windows=4", "train.epochs=1", "train.batch_size=8"]
    proc = subprocess.run([sys.executable, "launch/train.py", "--config", "stdlib_lm", "--quiet",
                           "--out-dir", str(tmp_path), *[a for s in sets for a in ("--set", s)]],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["kind"] == "paraformer_lm" and result["dataset"] == "text" and result["steps"] == 2
    assert 0 < result["val_bits_per_byte"] < 9 and result["checkpoint"]
    model, cfg = load_lm(result["run_dir"])
    assert isinstance(model, ParaFormerLM) and cfg.model.num_branches == 2 and not model.training
    out = generate(model, [[ord(c) for c in "def "]], 5)
    assert len(out[0]) == 5 and all(0 <= t < 259 for t in out[0])
    share, _ = load_lm(result["checkpoint"], branch_ids=[1])
    torch.testing.assert_close(share.branches[1].blocks[0].weights()["qkv_w"],
                               model.branches[1].blocks[0].weights()["qkv_w"])


@pytest.mark.parametrize("sets,words", [
    (["model.kind=paraformer_lm"], "cannot train on data.name=digits"),
    (["data.name=text"], "cannot train on data.name=text"),
    (["model.kind=serial_lm", "data.name=text", "model.context=1"], "model.context (1) must be in 2..65536"),
    (["model.kind=paraformer_lm", "data.name=text", "model.dropout=0.1"], "must be 0 for a language model"),
    (["model.kind=serial_lm", "data.name=text", "parallel.workers=2"], "needs model.kind 'paraformer' or"),
    (["model.kind=paraformer_lm", "data.name=text", "data.eval_windows=-2"], "data.eval_windows (-2)"),
    (["model.kind=gpt"], "model.kind ('gpt') must be one of"),
])
def test_bad_lm_config_is_one_sentence(sets, words):
    with pytest.raises(ConfigError) as err:
        load_config(None, sets)
    assert words in str(err.value) and "\n" not in str(err.value)


def test_cli_bad_value_exits_2(tmp_path):
    proc = subprocess.run([sys.executable, "launch/train.py", "--config", "stdlib_lm", "--set",
                           "model.context=0", "--out-dir", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0 and "model.context" in proc.stderr
    assert not any(tmp_path.iterdir())  # nothing written


def test_load_lm_refuses_what_is_not_an_lm_checkpoint(tmp_path, corpus):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_lm(tmp_path / "nowhere")
    cfg = load_config("tiny", ["train.epochs=1", "data.limit_train=16", f"train.out_dir={tmp_path}",
                               "parallel.workers=0"])
    image = run_training(cfg, tmp_path / "image", progress=False)
    with pytest.raises(CheckpointError, match="not a language model"):
        load_lm(image["run_dir"])
