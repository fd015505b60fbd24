"""The training cost model: wire traffic by hand, the NNLS fit on synthetic sweeps, the held-out
judgement, the 64-device extrapolation's picks, and the report's files. No Ray, no process group.

    .venv/bin/python -m pytest -q tests/bench/test_train_costmodel.py
"""

import csv
import itertools
import json

import numpy as np
import pytest

from layerpar.bench import train_report
from layerpar.bench.train_costmodel import (
    ModelShape,
    TrainCostModel,
    ddp_traffic,
    extrapolate,
    features,
    fit,
    fit_and_judge,
    mesh_traffic,
    nnls,
)

pytestmark = pytest.mark.unit

# N = 8, d = 192, B = 128, float32; params = 8 * 50_000 + 2_000 + 20_000 = 422_000
SHAPE = ModelShape(num_branches=8, dim=192, batch=128, p_branch=50_000, p_embed=20_000,
                   p_head=2_000, elem_bytes=4)
TRUE = TrainCostModel(a=10.0, t_rep=20.0, t_br=200.0, alpha=0.5, inv_beta=1e-5,  # 1e5 bytes/ms
                      kappa=1.3)


def test_mesh_traffic_by_hand():
    assert SHAPE.params == 422_000
    # 1x2: rows K=4 * 128 * 192 * 4 B = 393_216 B, all_gather over 2 sends 1x that, 1 step;
    # branch sum of 20_001 elements, 40_002 <= 2^20: gathered, 80_004 B, 1 step
    t = mesh_traffic(1, 2, SHAPE)
    assert t["by_verb"] == {"rows": 393_216, "replica_sum": 0, "branch_sum": 80_004}
    assert (t["bytes"], t["steps"], t["collectives"]) == (473_220, 2, 2)
    # 2x1: replica sum of 8 * 50_000 + 2_000 + 20_000 + 1 = 422_001 elements, * 2 = 844_002 <= 2^20:
    # gathered, 1_688_004 B, 1 step; no branch group
    t = mesh_traffic(2, 1, SHAPE)
    assert (t["bytes"], t["steps"], t["collectives"]) == (1_688_004, 1, 1)
    # on NCCL the same sum all-reduces: 2 * 1/2 * 1_688_004 B, 2 steps
    assert mesh_traffic(2, 1, SHAPE, backend="nccl")["steps"] == 2
    assert mesh_traffic(2, 1, SHAPE, backend="nccl")["bytes"] == 1_688_004
    # 2x2: rows 4 * 64 * 192 * 4 = 196_608 B; replica sum 4 * 50_000 + 22_001 = 222_001 elements,
    # gathered over 2: 888_004 B; branch sum 80_004 B; 3 steps, 3 collectives
    t = mesh_traffic(2, 2, SHAPE)
    assert t["by_verb"] == {"rows": 196_608, "replica_sum": 888_004, "branch_sum": 80_004}
    assert (t["bytes"], t["steps"], t["collectives"]) == (1_164_616, 3, 3)
    # 1x8: rows 1 * 128 * 192 * 4 = 98_304 B, 7 sent: 688_128 B, 7 steps; branch sum 20_001 * 8
    # elements gathered: 7 * 80_004 = 560_028 B, 7 steps
    t = mesh_traffic(1, 8, SHAPE)
    assert (t["bytes"], t["steps"], t["collectives"]) == (688_128 + 560_028, 6, 2)  # 3 + 3 hops
    # 4x1: 422_001 * 4 > 2^20: all_reduce, 2 * 3/4 * 1_688_004 = 2_532_006 B, 2 * log2(4) = 4 hops
    assert (mesh_traffic(4, 1, SHAPE)["bytes"], mesh_traffic(4, 1, SHAPE)["steps"]) == (2_532_006, 4)
    assert mesh_traffic(1, 1, SHAPE) == {"bytes": 0, "steps": 0, "collectives": 0,
                                         "by_verb": {"rows": 0, "replica_sum": 0, "branch_sum": 0}}


def test_mesh_traffic_max_over_uneven_ranks():
    # N = 3 on W = 2: ranks own 2 and 1 branches; R = 4. K=2: 2 * 200_000 + 22_001 = 422_001 el.,
    # * 4 > 2^20: all_reduce 1.5 * 1_688_004 = 2_532_006 B (6 steps). K=1: 222_001 el. * 4 <= 2^20:
    # gathered, 3 * 888_004 = 2_664_012 B (3 steps) -- the rank with FEWER branches sends more.
    shape = ModelShape(3, 192, 128, 200_000, 20_000, 2_000, 4)
    t = mesh_traffic(4, 2, shape)
    # rows: K_max=2 * 32 * 192 * 4 = 49_152 B (1 step); branch sum 80_004 B (1 step)
    assert t["by_verb"] == {"rows": 49_152, "replica_sum": 2_664_012, "branch_sum": 80_004}
    assert t["bytes"] == 49_152 + 2_664_012 + 80_004
    assert t["steps"] == 1 + 4 + 1  # the max over ranks: the all-reducing rank
    with pytest.raises(ValueError):
        mesh_traffic(1, 4, shape)


def test_ddp_traffic_by_hand():
    # DDP 2: all_reduce of 422_000 * 4 = 1_688_000 B: 2 * 1/2 of it sent, 2 steps per bucket
    assert ddp_traffic(2, SHAPE) == {"bytes": 1_688_000, "steps": 2, "collectives": 1,
                                     "by_verb": {"all_reduce": 1_688_000}}
    t = ddp_traffic(4, SHAPE, buckets=3)  # 2 * 3/4 * 1_688_000 = 2_532_000 B; 3 * 6 steps
    assert (t["bytes"], t["steps"], t["collectives"]) == (2_532_000, 12, 3)
    assert ddp_traffic(1, SHAPE)["bytes"] == 0
    f = ModelShape(8, 192, 128, 50_000, 20_000, 2_000, elem_bytes=8)
    assert ddp_traffic(2, f)["bytes"] == 2 * 1_688_000


def test_nnls_matches_brute_force():
    rng = np.random.default_rng(0)
    for _ in range(30):
        A, b = rng.normal(size=(9, 5)) * rng.uniform(1e-3, 1e3, size=5), rng.normal(size=9)
        best = np.zeros(5), np.linalg.norm(b)
        for k in range(1, 6):
            for cols in itertools.combinations(range(5), k):
                z = np.linalg.lstsq(A[:, cols], b, rcond=None)[0]
                if (z > 0).all() and (res := np.linalg.norm(A[:, cols] @ z - b)) < best[1]:
                    best = np.zeros(5), res
                    best[0][list(cols)] = z
        x = nnls(A, b)
        assert (x >= 0).all()
        assert np.linalg.norm(A @ x - b) == pytest.approx(best[1], rel=1e-7, abs=1e-9)
    assert nnls(np.eye(2), np.array([1.0, -1.0])).tolist() == [1.0, 0.0]


def sweep(model=TRUE, shape=SHAPE, *, devices=8, noise=0.005, seed=1):
    """Rows a sweep over D = 1, 2, 4, 8 would give if the model were true (+- noise)."""
    rng, rows = np.random.default_rng(seed), [{"system": "one-process", "R": 1, "W": 1, "D": 1}]
    rows += [{"system": "one-process", "R": 1, "W": 1, "D": 1, "f_rep": 1.0, "f_br": 0.5},  # N/2
             {"system": "one-process", "R": 1, "W": 1, "D": 1, "f_rep": 0.5, "f_br": 0.5}]  # B/2
    for d in (2, 4, 8):
        rows += [{"system": "layerpar", "R": d // w, "W": w, "D": d} for w in (1, 2, 4, 8) if w <= d]
        rows.append({"system": "ddp", "R": d, "W": 1, "D": d})
    for r in rows:
        t = ddp_traffic(r["D"], shape) if r["system"] == "ddp" else mesh_traffic(r["R"], r["W"], shape)
        r.update(devices=devices, bytes=t["bytes"], steps=t["steps"], backend="gloo")
        ph = model.phases(r, shape)
        r["step_ms"] = sum(ph.values()) * (1 + noise * rng.standard_normal())
        r.update(compute_ms=ph["compute_ms"], collectives_ms=ph["latency_ms"] + ph["bandwidth_ms"])
    return rows


def test_features_oversubscription_and_ddp():
    x = features({"system": "layerpar", "R": 2, "W": 4, "D": 8, "devices": 2}, SHAPE)
    # s = 8 / 2 = 4; f_rep = 1/2; f_br = (2/8)/2; traffic from the ring rules when not given
    assert x[:3].tolist() == [4.0, 2.0, 0.5]
    assert x[3:].tolist() == [4 * mesh_traffic(2, 4, SHAPE)["steps"], mesh_traffic(2, 4, SHAPE)["bytes"]]
    assert features({"system": "ddp", "D": 4, "devices": 4, "bytes": 9, "steps": 6}, SHAPE).tolist() \
        == [1.0, 0.25, 0.25, 6.0, 9.0]
    assert features({"system": "one-process", "devices": 2}, SHAPE).tolist() == [1, 1, 1, 0, 0]


def test_fit_recovers_coefficients():
    m = fit(sweep(noise=0.002), SHAPE)
    for name in ("a", "t_rep", "t_br", "alpha", "inv_beta", "kappa"):
        assert getattr(m, name) == pytest.approx(getattr(TRUE, name), rel=0.15), name
    exact = fit(sweep(noise=0.0), SHAPE)
    for name in ("a", "t_rep", "t_br", "alpha", "inv_beta", "kappa"):
        assert getattr(exact, name) == pytest.approx(getattr(TRUE, name), rel=1e-6), name
    assert TrainCostModel.from_dict(exact.to_dict()) == exact
    assert exact.to_dict()["beta_gbit_s"] == pytest.approx(0.8, rel=1e-6)  # 1e5 B/ms = 0.8 Gbit/s


def test_fit_and_judge_flags_and_errors():
    rows = sweep()
    out = fit_and_judge(rows, SHAPE)
    fitted = {(r["system"], r["R"], r["W"]) for r in rows if r["fit"]}
    assert fitted == {("one-process", 1, 1), ("layerpar", 1, 2), ("layerpar", 2, 1), ("ddp", 2, 1),
                      ("layerpar", 1, 4), ("layerpar", 4, 1), ("layerpar", 1, 8), ("layerpar", 8, 1)}
    # 2x2, 2x4, 4x2 are held out; DDP at D = 4 and 8 have the features of the fit points 4x1 and 8x1
    # (every gradient summed over D replicas, the same compute shares): not held out, labelled
    assert sum(not r["fit"] for r in rows) == 5
    assert sorted((p["layout"], p["D"]) for p in out["held_out_points"]) == [("2x2", 4), ("2x4", 8),
                                                                             ("4x2", 8)]
    assert sorted((p["layout"], p["D"], p["same_features_as"]) for p in out["same_features_points"]) \
        == [("ddp", 4, "4x1@D4"), ("ddp", 8, "8x1@D8")]
    assert next(r for r in rows if r["system"] == "ddp" and r["D"] == 4)["same_features_as"] == "4x1@D4"
    # every error the run showed, side by side; a pick is judged against the largest
    assert out["pick_error"] == max(out["max_abs_error_fit"], out["max_abs_error_held_out"],
                                    out["loo_max_abs_error"])
    assert all(r["pred_error"] == pytest.approx((r["predicted_ms"] - r["step_ms"]) / r["step_ms"])
               for r in rows)
    assert out["max_abs_error_held_out"] < 0.05
    assert out["loo_max_abs_error"] < 0.05
    assert out["coefficients"]["t_br_ms"] == pytest.approx(200, rel=0.15)
    assert set(out["extrapolation"]["picks"]) == {"10", "100"}


def test_two_cores_are_resolved_by_the_calibration_points():
    # on 2 devices every D >= 2 point time-shares so that s * f_br = 1/2: the multi-rank points
    # cannot tell a from t_br; one process and its calibrations (half the branches, half the rows) can
    rows = sweep(devices=2, noise=0.0)
    assert all(features(r, SHAPE)[2] == 0.5 for r in rows if r["D"] > 1)
    out = fit_and_judge(rows, SHAPE)
    assert out["coefficients"]["t_br_ms"] == pytest.approx(200, rel=1e-6)
    assert out["coefficients"]["kappa"] == pytest.approx(1.3, rel=1e-6)
    assert out["max_abs_error_held_out"] < 1e-6 and out["loo_max_abs_error"] < 1e-6


def test_too_few_points_says_so():
    rows = [r for r in sweep() if r["D"] <= 2 and r["system"] != "ddp"]  # one-process, 1x2, 2x1
    out = fit_and_judge(rows, SHAPE)
    assert all(r["fit"] for r in rows)
    assert out["held_out_points"] == [] and out["max_abs_error_held_out"] is None
    assert out["held_out_note"]
    assert fit_and_judge(rows[:1], SHAPE)["loo_max_abs_error"] is None


def test_extrapolate_layouts_and_picks():
    ex = extrapolate(TRUE, SHAPE, devices=64, rates_gbit=(10, 100))
    for rate in (10, 100):
        group = [r for r in ex["rows"] if r["rate_gbit"] == rate]
        assert [r["layout"] for r in group] == ["64x1", "32x2", "16x4", "8x8", "ddp"]
        best = min(group, key=lambda r: r["predicted_ms"])
        assert [r for r in group if r["picked"]] == [best]
        assert ex["picks"][f"{rate}"] == best["layout"]
        for r in group:
            assert r["predicted_ms"] == pytest.approx(r["compute_ms"] + r["latency_ms"]
                                                      + r["bandwidth_ms"])
            assert r["samples_per_s"] == pytest.approx(128 / r["predicted_ms"] * 1e3)
            assert r["bandwidth_ms"] == pytest.approx(r["bytes"] / (rate * 1.25e5))  # Gbit/s -> B/ms
    # W must divide the devices: 12 devices, N = 8 -> W in 1, 2, 4
    assert [r["layout"] for r in extrapolate(TRUE, SHAPE, devices=12, rates_gbit=(1,))["rows"]] \
        == ["12x1", "6x2", "3x4", "ddp"]


def test_picks_within_the_model_error_are_too_close_to_call():
    ex = extrapolate(TRUE, SHAPE, devices=64, rates_gbit=(10, 100))
    for rate in ("10", "100"):
        # DDP and 64x1 are one computation under two names: the runner-up is the next distinct time
        times = sorted(r["predicted_ms"] for r in ex["rows"] if f"{r['rate_gbit']:g}" == rate)
        gap = next(t for t in times if t > times[0] * (1 + 1e-6)) / times[0] - 1
        wide = extrapolate(TRUE, SHAPE, devices=64, rates_gbit=(float(rate),), error=gap + 0.01)
        assert wide["close"][rate].startswith(f"too close to call within the model's {gap + 0.01:.0%} error")
        assert not ({"ddp", "64x1"} <= set(wide["close"][rate].replace(":", " ").split())), wide["close"]
        narrow = extrapolate(TRUE, SHAPE, devices=64, rates_gbit=(float(rate),), error=gap / 2)
        assert narrow["close"] == {} and narrow["picks"] == wide["picks"]
    assert ex["close"] == {}  # no error given: nothing to judge against
    # fit_and_judge passes the run's largest error; the report says it beside the pick
    rows = sweep(noise=0.05)
    out = fit_and_judge(rows, SHAPE)
    assert out["extrapolation"]["error"] == out["pick_error"] > 0


def test_slow_link_picks_branch_parallel_over_ddp():
    # large branches (10M params each), small rows (d = 64, B = 64): DDP all-reduces 80M params,
    # an 8x8 mesh sums one branch per replica group
    big = ModelShape(num_branches=8, dim=64, batch=64, p_branch=10_000_000, p_embed=100_000,
                     p_head=10_000, elem_bytes=4)
    ex = extrapolate(TRUE, big, devices=64, rates_gbit=(0.1, 1000))
    slow = next(r for r in ex["rows"] if r["rate_gbit"] == 0.1 and r["picked"])
    assert slow["system"] == "layerpar" and slow["W"] > 1
    ddp = next(r for r in ex["rows"] if r["rate_gbit"] == 0.1 and r["system"] == "ddp")
    assert ddp["bytes"] > 4 * slow["bytes"]


def test_write_report_files(tmp_path):
    rows = sweep()
    summary = fit_and_judge(rows, SHAPE)
    meta = {"command": "python launch/train_sweep.py --tiny", "machine": "2-core test box",
            "duration_s": 12.0, "notes": ["two cores: D > 2 time-shares"],
            "link": {"1 Gbit/s": {"layerpar_ms": 40.0, "ddp_ms": 90.0, "ratio": 2.25}},
            "reference": {"layerpar_bytes": 1_164_616, "ddp_bytes": 2_532_000, "ratio": 2.17}}
    out = train_report.write(rows, shape=SHAPE, model_summary=summary, out_dir=tmp_path / "run",
                             meta=meta)
    for key in ("out_dir", "files", "best_layerpar", "ddp_samples_per_s",
                "bytes_ratio_ddp_over_layerpar", "max_abs_error_held_out", "picks"):
        assert key in out, key
    for name in ("results.csv", "results.json", "report.md"):
        assert (tmp_path / "run" / name).stat().st_size > 0
    pngs = {"samples_by_devices.png", "predicted_vs_measured.png"}
    if _has_matplotlib():
        assert pngs <= set(out["files"])
    assert set(out["best_layerpar"]) == {"2", "4", "8"} and set(out["ddp_samples_per_s"]) == {"2", "4", "8"}
    d2 = next(r for r in rows if r["system"] == "ddp" and r["D"] == 2)
    fewest = min(r["bytes"] for r in rows if r["system"] == "layerpar" and r["D"] == 2)  # 1x2's
    assert out["bytes_ratio_ddp_over_layerpar"]["2"] == pytest.approx(d2["bytes"] / fewest)
    with open(tmp_path / "run" / "results.csv") as f:
        table = list(csv.DictReader(f))
    assert len(table) == len(rows) and {"step_ms", "samples_per_s", "fit", "pred_error"} <= set(table[0])
    data = json.loads((tmp_path / "run" / "results.json").read_text())
    assert data["meta"]["command"] == meta["command"] and len(data["rows"]) == len(rows)
    assert data["cost_model"]["extrapolation"]["picks"] == out["picks"]
    md = (tmp_path / "run" / "report.md").read_text()
    for text in ("### D = 2", "### D = 8", "| system | layout | samples/s | step ms", "DDP / layerpar",
                 "## Cost model", "Extrapolation to 64 devices", "**pick**", "Picks:", "## Slow link",
                 "Reference configuration", "two cores: D > 2 time-shares", "held out",
                 "- on the fit points: ", "- leave-one-out (", "- held out: ", "bytes/step (counted)",
                 "Not held out (the same features as a fit point", "same features as 4x1@D4"):
        assert text in md, text
    # a pick within the model's error says so in the report
    summary["extrapolation"]["close"] = {"10": "too close to call within the model's 30% error: x"}
    train_report.write(rows, shape=SHAPE, model_summary=summary, out_dir=tmp_path / "run2", meta=meta)
    assert "10 Gbit/s -> " in (md := (tmp_path / "run2" / "report.md").read_text())
    assert "(too close to call within the model's 30% error: x)" in md


def _has_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True
