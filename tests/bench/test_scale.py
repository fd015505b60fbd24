"""The scaling tool: a tiny sweep writes the four files and the plots with the documented schema;
every system's logits equal its single-process model's on the same input, and at every point of the
sweep the systems that compute the same model (layerpar over both transports and reference-threads;
vit-1dev and vit-pipeline) each have a row, checked against that one shared reference, so they agree
with each other; plus the pieces (timing summary, cost model, pipeline stages) on their own, without Ray.

    .venv/bin/python -m pytest -q tests/bench/test_scale.py -x
"""

import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from layerpar.bench import costmodel
from layerpar.bench.harness import measure, percentile, summarize
from layerpar.bench.pipeline import ViTStage, stage_bounds
from layerpar.bench.report import CSV_COLUMNS
from layerpar.bench.systems import ReferenceThreads, micro_batches_for

ROW_KEYS = {"system", "N", "W", "batch", "blocks", "params", "oversubscribed", "reps", "warmup",
            "p50_ms", "p95_ms", "mean_ms", "min_ms", "max_ms", "iqr_ms", "spread", "throughput_sps",
            "speedup", "efficiency", "weak_efficiency", "max_abs_diff", "logits_match"}


def _last_json(text: str) -> dict:
    return json.loads(text.strip().splitlines()[-1])


@pytest.mark.ray
def test_tiny_sweep_files_schema_and_equal_logits(tmp_path):
    # its own process, so it starts its own local Ray sized for the sweep (as launch/scale.py does),
    # whatever Ray instance another tier's fixture left in this one
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.run([sys.executable, "launch/scale.py", "--preset", "tiny", "--out-dir",
                           str(tmp_path)], capture_output=True, text=True, timeout=600, cwd=root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = _last_json(proc.stdout)
    run_dir = tmp_path / summary["run_dir"].rsplit("/", 1)[-1]
    for name in ("results.csv", "results.json", "report.md", "latency_vs_n.png", "speedup_vs_w.png",
                 "measured_vs_predicted.png"):
        assert (run_dir / name).stat().st_size > 0, name

    result = json.loads((run_dir / "results.json").read_text())
    env = result["environment"]
    for key in ("device", "cpu_model", "torch", "ray", "command", "devices"):
        assert env[key], key
    assert env["command"].startswith("python launch/scale.py --preset tiny")
    assert result["skipped"] == [], result["skipped"]  # a point that could not run is a failure here
    rows = result["rows"]
    systems = {r["system"] for r in rows}
    assert systems == {"layerpar-collective", "layerpar-object_store", "reference-threads",
                       "vit-1dev", "vit-pipeline"}
    for r in rows:
        assert ROW_KEYS <= set(r), ROW_KEYS - set(r)
        assert r["reps"] >= 2 and 0 < r["min_ms"] <= r["p50_ms"] <= r["p95_ms"] <= r["max_ms"]
        # the same input, the same weights: every system gives its single-process model's logits
        assert r["logits_match"] and r["max_abs_diff"] <= 1e-4, r
    layerpar = [r for r in rows if r["system"].startswith("layerpar-")]
    for r in layerpar:
        assert {"embed", "broadcast", "compute", "reduce", "head", "dispatch"} <= set(r["phases_ms"])
        assert r["bytes"]["broadcast"] > 0 and r["predicted_ms"] > 0
    # Across systems: at every (N, W, batch) where layerpar ran, both transports and the
    # reference-style threads computed the same Para-Former, and the serial ViT and its pipeline the
    # same ViT. Each row's max_abs_diff is against the one single-process tensor of its model at that
    # point (bench/scale.py: Sweep.truth), so two systems within atol of it are within 2 * atol of each
    # other: a missing system or a transport that sums differently fails here.
    atol = result["settings"]["atol"]
    same_model = {"paraformer": {"layerpar-collective", "layerpar-object_store", "reference-threads"},
                  "vit": {"vit-1dev", "vit-pipeline"}}
    points = {(r["N"], r["W"], r["batch"]) for r in layerpar}
    assert points and {(n, w) for n, w, _ in points} >= {(1, 1), (2, 2)}
    for n, w, batch in points:
        here = {r["system"]: r for r in rows if (r["N"], r["W"], r["batch"]) == (n, w, batch)}
        assert same_model["paraformer"] <= set(here), (n, w, batch, sorted(here))
        for system in same_model["paraformer"]:
            assert here[system]["max_abs_diff"] <= atol, here[system]
    # the serial ViT wherever its pipeline ran (W = 2 <= N), both against the one ViT of that N
    vit_1dev = {(r["N"], r["batch"]) for r in rows if r["system"] == "vit-1dev"}
    piped = {(r["N"], r["batch"]) for r in rows if r["system"] == "vit-pipeline"}
    assert piped and piped <= vit_1dev, (piped, vit_1dev)
    assert all(r["max_abs_diff"] <= atol for r in rows if r["system"] in same_model["vit"])

    with open(run_dir / "results.csv") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == CSV_COLUMNS
        assert len(list(reader)) == len(rows)
    assert result["cost_model"] and all(m["extrapolation"] for m in result["cost_model"].values())
    assert max(e["W"] for m in result["cost_model"].values() for e in m["extrapolation"]) == 64
    for key in ("layerpar_vs_pipeline_speedup", "layerpar_vs_reference_ratio", "logits_match",
                "layerpar_depth_ratio", "vit_depth_ratio"):
        assert key in summary, key
    # the depth ratios come from N = 1 / W = 1 and N = 2 / W = 2 measured side by side
    pairs = result["depth_pair"]
    assert summary["depth_ratios_from"] == "depth pair (interleaved)"
    assert {(r["system"], r["N"], r["W"]) for r in pairs} == {
        (s, n, n) for s in ("layerpar-collective", "layerpar-object_store") for n in (1, 2)} | {
        ("vit-1dev", 1, 1), ("vit-1dev", 2, 1)}
    assert all(r["logits_match"] for r in pairs)
    two, one = (next(r["p50_ms"] for r in pairs if r["system"] == "layerpar-collective" and r["N"] == n)
                for n in (2, 1))
    assert math.isclose(summary["layerpar_depth_ratio"], two / one)
    assert summary["logits_match"] is True
    assert "## Headline" in (run_dir / "report.md").read_text()


@pytest.mark.unit
def test_gpu_preset_skips_cleanly_without_cuda_and_never_imports_ray(tmp_path):
    code = ("import sys; from layerpar.bench.scale import cli_main; "
            f"rc = cli_main(['--preset', 'gpu-one', '--out-dir', {str(tmp_path)!r}, "
            "'--set', 'bench.branches=[1,2]', '--set', 'bench.batches=[1]']); "
            "assert 'ray' not in sys.modules, 'the gpu preset imported ray'; sys.exit(rc)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    summary = _last_json(out.stdout)
    if torch.cuda.is_available():
        assert summary["logits_match"] is True
    else:
        assert "skipped" in summary


@pytest.mark.unit
def test_bad_bench_key_is_one_clear_error(capsys):
    from layerpar.bench.scale import cli_main

    assert cli_main(["--preset", "tiny", "--set", "bench.nope=1"]) == 2
    assert "bench.nope" in capsys.readouterr().err
    assert cli_main(["--preset", "huge"]) == 2
    assert "presets" in capsys.readouterr().err


@pytest.mark.unit
def test_timing_summary():
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5
    t = summarize([0.001 * i for i in range(1, 101)], warmup=3, phases=[{"a": 0.002}] * 4)
    assert t.reps == 100 and t.warmup == 3
    assert math.isclose(t.p50_ms, 50.5) and math.isclose(t.p95_ms, 95.05)
    assert math.isclose(t.phases_ms["a"], 2.0) and 0.9 < t.spread < 1.1
    calls = []
    # a budget that only a hang reaches: the repetition counts below cannot depend on the machine
    timing, out = measure(lambda: calls.append(1) or len(calls), warmup=2, reps=7, min_reps=3,
                          max_seconds=3600.0)
    assert timing.reps == 7 and len(calls) == 9 and out == 9
    timing, _ = measure(lambda: None, warmup=0, reps=1000, min_reps=4, max_seconds=0.0)
    assert timing.reps == 4  # the time budget stops it, never below min_reps


@pytest.mark.unit
def test_cost_model_recovers_its_own_coefficients_and_judges_held_out_points():
    true = costmodel.CostModel(T_embed=1.0, t_branch=3.0, t_broadcast=0.5, r0=0.1, r1=0.4, d0=0.6,
                               d1=0.2, T_head=0.05, kappa=1.3)
    rows = []
    for n in (1, 2, 4, 8):
        for w in (1, 2, 4):
            if w <= n:
                ph = true.phases(n, w, devices=2)
                rows.append({"system": "layerpar-collective", "batch": 1, "N": n, "W": w,
                             "phases_ms": ph, "p50_ms": sum(ph.values())})
    models = costmodel.fit_and_judge(rows, devices=2)
    m = models["layerpar-collective/b1"]
    for k, v in true.to_dict().items():
        assert math.isclose(m["coefficients_ms"][k], v, rel_tol=1e-6, abs_tol=1e-9), k
    assert sorted(m["fit_points"]) == [[1, 1], [8, 1], [8, 2]]
    assert [4, 4] in m["held_out_points"] and m["max_abs_error_held_out"] < 1e-9
    assert all(not r["fit"] or r["W"] <= 2 for r in rows)
    big = {(e["N"], e["W"]): e["predicted_ms"] for e in m["extrapolation"]}
    assert math.isclose(big[(64, 64)], true.predict(64, 64), rel_tol=1e-9)
    # 4 workers on 2 devices: embed and compute take twice as long
    assert true.phases(8, 4, devices=2)["compute"] == 2 * true.phases(8, 4)["compute"]


@pytest.mark.unit
def test_pipeline_stages_chain_to_the_vit_and_threads_match_the_model():
    from layerpar.config import ModelConfig
    from layerpar.model import ParaFormer, ViT

    assert stage_bounds(5, 2) == [(0, 3), (3, 5)]
    with pytest.raises(ValueError):
        stage_bounds(2, 3)
    assert micro_batches_for(1, 2) == 1 and micro_batches_for(8, 2) == 4 and micro_batches_for(6, 4) == 6
    cfg = ModelConfig(image_size=8, patch_size=2, dim=16, heads=2, mlp_dim=32, num_branches=3,
                      branch_depth=2)
    x = torch.randn(3, 1, 8, 8)
    vit = ViT(cfg).eval()
    with torch.no_grad():
        h = x
        for lo, hi in stage_bounds(6, 3):
            h = ViTStage(vit, lo, hi)(h)
        assert torch.allclose(h, vit(x), atol=1e-6)
        model = ParaFormer(cfg).eval()
        ref = ReferenceThreads(model, workers=2)
        try:
            assert torch.allclose(ref.run(x), model(x), atol=1e-6)
        finally:
            ref.close()


@pytest.mark.unit
@pytest.mark.parametrize("style", ["prenorm", "reference"])
def test_cls_only_last_block_is_a_pure_saving(style):
    """The benchmarks' models compute only the CLS row in their last block (CLS pooling): the
    logits equal those of the full last block, fused (batched and per-branch loop) or not."""
    from layerpar.config import ModelConfig
    from layerpar.model import ParaFormer, ViT
    from layerpar.model import fused as fused_mod
    from layerpar.model.layers import pool

    cfg = ModelConfig(image_size=8, patch_size=2, dim=16, heads=2, mlp_dim=32, num_branches=3,
                      branch_depth=2, style=style)
    x = torch.randn(2, 1, 8, 8)
    model, vit = ParaFormer(cfg).eval(), ViT(cfg).eval()
    with torch.no_grad():
        x0 = model.embed(x)
        full = torch.stack([model.branch(b)(x0)[:, 0] for b in model.branch_ids])  # every row
        for threshold in (10**9, 1):  # batched stack, then the per-branch loop
            old, fused_mod.LOOP_MIN_ELEMENTS = fused_mod.LOOP_MIN_ELEMENTS, threshold
            try:
                model._stacks.clear()
                assert torch.allclose(model.branch_outputs(x0, model.branch_ids), full, atol=1e-6)
            finally:
                fused_mod.LOOP_MIN_ELEMENTS = old
        assert torch.allclose(model.branch_outputs(x0, model.branch_ids, fused=False), full,
                              atol=1e-6)
        h = vit.embed(x)
        for block in vit.blocks:
            h = block(h)
        assert torch.allclose(vit(x), vit.head(pool(h, "cls")), atol=1e-6)


@pytest.mark.unit
def test_interleaved_timing_round_robins_and_keeps_each_systems_budget():
    from layerpar.bench.harness import measure_interleaved

    order = []
    fns = {name: (lambda name=name: order.append(name) or name) for name in ("a", "b", "c")}
    out = measure_interleaved(fns, warmup=1, reps=4, min_reps=2, max_seconds=3600.0)  # only a hang
    assert [out[n][0].reps for n in "abc"] == [4, 4, 4]
    assert all(out[n][1] == n for n in "abc")
    timed = order[3:]  # after one warm-up call each
    assert timed[:3] == ["a", "b", "c"] and timed[3:6] == ["b", "c", "a"]  # the first one rotates
    out = measure_interleaved(fns, warmup=0, reps=100, min_reps=3, max_seconds=0.0)
    assert [out[n][0].reps for n in "abc"] == [3, 3, 3]
