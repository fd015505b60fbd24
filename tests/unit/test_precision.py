"""train.precision (mixed precision under torch.autocast) and model.compile (torch.compile of the
fused branch stack), in one process on the CPU. The distributed bfloat16 run is
tests/distributed/test_precision_bf16.py; the digits accuracy comparison (bfloat16 within 0.01 of
float32) and the step-time figures are launch/bench_precision.py (too slow for the suite here)."""

import shutil

import pytest
import torch

from layerpar.config import ConfigError, load_config
from layerpar.train.checkpoint import load_checkpoint
from layerpar.train.loop import run_training
from layerpar.train.precision import LossScale
from layerpar.train.rank_loop import ShardEval
from layerpar.train.shard import BranchShard


def batch(i: int):
    g = torch.Generator().manual_seed(i)
    return torch.randn(16, 1, 8, 8, generator=g), torch.randint(0, 4, (16,), generator=g)


@pytest.mark.parametrize(("sets", "words"), [
    (["train.precision=half"], "train.precision"),
    (["train.precision=bfloat16", "model.dtype=float64"], "model.dtype=float32"),
    (["train.precision=float16"], "needs a GPU"),
])
def test_bad_precision_is_a_config_error_naming_the_field(sets, words):
    with pytest.raises(ConfigError, match=words):
        load_config("tiny", sets)


def test_precision_and_compile_are_set_from_the_command_line():
    cfg = load_config("tiny", ["train.precision=bfloat16", "model.compile=true"])
    assert cfg.train.precision == "bfloat16" and cfg.model.compile is True
    assert load_config("tiny").train.precision == "float32" and load_config("tiny").model.compile is False


def _steps(cfg, n: int = 3):
    shard = BranchShard(cfg, worker_rank=0, total_steps=20)  # a world of one: every branch, LocalComm
    return shard, [shard.train_step(*batch(i))["loss"] for i in range(n)]


def test_bf16_trains_under_autocast_with_float32_master_weights(tiny_cfg):
    f32, f32_losses = _steps(tiny_cfg)
    bf16, bf16_losses = _steps(tiny_cfg.replace(train={"precision": "bfloat16"}))
    assert bf16_losses != f32_losses  # autocast is on: the numbers are bfloat16's
    assert bf16_losses == pytest.approx(f32_losses, rel=0.02)  # and close to float32's
    for name, p in bf16.model.named_parameters():
        assert p.dtype == torch.float32, name  # master weights
        for v in bf16.opt.state[p].values():
            assert v.dtype == torch.float32 or v.dim() == 0, name  # AdamW state
    logits = ShardEval(bf16, bf16.comms[1]).prefix_logits(batch(9)[0])
    assert logits.dtype == torch.float32 and logits.shape == (4, 16, 4)  # every prefix, float32


def test_bf16_run_writes_a_float32_checkpoint_that_loads(tmp_path, tiny_cfg):
    cfg = tiny_cfg.replace(train={"precision": "bfloat16", "epochs": 1})
    result = run_training(cfg, tmp_path / "run", progress=False)
    assert 0.0 <= result["test_accuracy"] <= 1.0 and not result["stopped_early"]
    ckpt = load_checkpoint(result["checkpoint"])
    assert all(t.dtype == torch.float32 for piece in ckpt.tensors.values() for t in piece.values())


def test_loss_scale_skips_an_overflowed_step_and_halves():
    scale = LossScale(init=1024.0, interval=2)
    assert not scale.update(False) and scale.scale == 512.0
    assert scale.update(True) and scale.update(True) and scale.scale == 1024.0  # grows after 2 good


@pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None,
                    reason="torch.compile (inductor) needs a C compiler: neither cc nor gcc is on PATH")
def test_compiled_branch_stack_gives_the_eager_outputs(tiny_cfg):
    eager = BranchShard(tiny_cfg, worker_rank=0)
    compiled = BranchShard(tiny_cfg.replace(model={"compile": True}), worker_rank=0)
    assert "branch_outputs" in vars(compiled.model)  # the compiled function shadows the method
    x = batch(0)[0]
    got = compiled.branch_outputs(x)
    torch.testing.assert_close(got, eager.branch_outputs(x), atol=1e-5, rtol=1e-5)
    assert compiled.model.state_dict().keys() == eager.model.state_dict().keys()  # checkpoints unchanged


def test_inference_accepts_the_precision_setting(tiny_cfg):
    from layerpar.train.local import LocalBackend

    x, bf16_cfg = batch(3)[0], tiny_cfg.replace(train={"precision": "bfloat16"})
    with LocalBackend(tiny_cfg) as f32, LocalBackend(bf16_cfg) as bf16:
        got, want = bf16.infer(x), f32.infer(x)
        assert got.dtype == torch.float32 and not torch.equal(got, want)  # computed under autocast
        torch.testing.assert_close(got, want, atol=0.05, rtol=0.05)
        assert bf16.prefix_logits(x).dtype == torch.float32
