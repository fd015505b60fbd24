"""Ray Train tier: the language model on the one loop under Ray Train and Ray Tune. W = 2 ranks,
driven by a one-trial Tune sweep, train the Para-Former LM progressively (float64) and end at the
single process's weights to 1e-10, with the same loss and validation bits per byte in the epoch
record, the same test bits per byte, Tune seeing the trial's metrics, and a checkpoint load_lm
loads. One tiny run: Ray Train's start dominates."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from layerpar.config import load_config
from layerpar.train.lm_checkpoint import load_lm
from layerpar.train.loop import run_training
from layerpar.train.tune import sweep
from tests.parity import FLOAT64_ATOL, assert_weights_match
from tests.raytrain.conftest import final_weights

pytestmark = pytest.mark.ray


def test_lm_two_ranks_equal_single_process(local_ray, tmp_path):
    root = tmp_path / "corpus"
    root.mkdir()
    for i in range(8):
        (root / f"m{i}.py").write_text("".join(f"x{j} = {i} + {j}\n" for j in range(20)))
    sets = ["model.kind=paraformer_lm", "data.name=text", f"data.root={root}", "model.context=16",
            "model.dim=16", "model.heads=2", "model.mlp_dim=32", "model.num_branches=4",
            "model.branch_depth=2",
            "model.dtype=float64", "train.mode=progressive", "train.epochs=1", "train.batch_size=4",
            "data.limit_train=12", "data.eval_windows=4", "parallel.timeout_s=60"]
    one = run_training(load_config(None, sets), tmp_path / "one", progress=False)
    # the W = 2 run is a one-trial Ray Tune sweep (the trial drives the same TorchTrainer, its epoch
    # reports reach Tune): the LM's loop under Tune and under Ray Train in one run
    cfg = load_config(None, [*sets, "parallel.workers=2", f"train.out_dir={tmp_path}"])
    out = sweep(cfg, lrs=[cfg.train.lr], weight_decays=[cfg.train.weight_decay], name="sweep")
    (trial,) = out["trials"]
    assert "error" not in trial, trial
    assert trial["val_accuracy"] == pytest.approx(one["val_accuracy"]) and trial["steps"] == one["steps"]
    (run,) = [p for p in (tmp_path / "sweep").iterdir() if (p / "result.json").is_file()]
    got = json.loads((run / "result.json").read_text())
    assert got["trainer"].startswith("ray.train.torch.TorchTrainer") and got["workers"] == 2
    assert got["steps"] == one["steps"] == 3 * 5  # 3 batches, 4 prefixes + the joint step each
    assert_weights_match(final_weights(got), final_weights(one), cfg, steps=got["steps"],
                         total_steps=got["steps"])
    (m_got,), (m_one,) = ([json.loads(s) for s in (Path(r["run_dir"]) / "metrics.jsonl").read_text()
                           .splitlines()] for r in (got, one))
    assert m_got["train_loss"] == pytest.approx(m_one["train_loss"], abs=FLOAT64_ATOL)
    assert m_got["val_prefix_bits_per_byte"] == pytest.approx(m_one["val_prefix_bits_per_byte"], abs=1e-9)
    assert got["test_bits_per_byte"] == pytest.approx(one["test_bits_per_byte"], abs=1e-9)
    model, _ = load_lm(got["run_dir"])
    assert model.branch_ids == [0, 1, 2, 3]
