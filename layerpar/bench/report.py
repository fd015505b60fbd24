"""A scaling run's outputs: results.csv, results.json, report.md and PNG plots, plus the headline
ratios (the JSON summary a script tracks).

    run_dir/results.csv       one row per (system, N, W, batch)
    run_dir/results.json      rows + environment (device, CPU/GPU model, versions, exact command),
                              cost model, extrapolation to W = 64, headline ratios with targets
    run_dir/report.md         the same for people, with the plots
    run_dir/*.png             latency vs N, speed-up vs W, measured vs predicted
"""

from __future__ import annotations

import csv
import datetime as dt
import importlib.metadata
import json
import math
import os
import platform
import sys
from pathlib import Path

import torch

from layerpar.bench import costmodel
from layerpar.bench.plots import write_plots
from layerpar.bench.summary import markdown

PHASE_COLUMNS = [f"phase_{p}_ms" for p in costmodel.PHASES]
CSV_COLUMNS = ["system", "N", "W", "batch", "blocks", "params", "oversubscribed", "reps", "warmup",
               "p50_ms", "p95_ms", "mean_ms", "min_ms", "max_ms", "iqr_ms", "spread",
               "throughput_sps", "speedup", "efficiency", "weak_efficiency", *PHASE_COLUMNS,
               "bytes_broadcast", "bytes_reduce", "micro_batches", "fit", "predicted_ms",
               "pred_error", "max_abs_diff", "logits_match"]
# Headline targets (issue 6): name -> (comparison, bound).
TARGETS = {"layerpar_depth_ratio": ("<=", 1.15), "layerpar_vs_pipeline_speedup": (">=", 1.5),
           "layerpar_vs_reference_ratio": ("<=", 1.1), "costmodel_max_held_out_error": ("<=", 0.25),
           "gpu_paraformer_n16_vs_n1_b1": ("<=", 1.5), "gpu_paraformer_graph_n16_vs_n1_b1": ("<=", 1.5)}


def _version(pkg: str) -> str | None:
    try:
        return importlib.metadata.version(pkg)  # reads metadata: never imports the package
    except importlib.metadata.PackageNotFoundError:
        return None


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(*, gpu: bool, devices: int, command: str, address: str | None,
                cluster: dict | None = None) -> dict:
    env = {"hostname": platform.node(), "platform": platform.platform(),
           "python": platform.python_version(), "cpu_model": cpu_model(), "cpu_count": os.cpu_count(),
           "torch": torch.__version__, "ray": _version("ray"), "devices": devices,
           "device": "cuda" if gpu else "cpu", "command": command, "argv": sys.argv,
           "ray_address": address, "ray_imported": "ray" in sys.modules, "cluster": cluster,
           "cluster_simulated": bool(cluster and cluster["simulated_on_one_machine"])}
    if gpu and torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        env.update(gpu_model=torch.cuda.get_device_name(0), gpu_memory_gib=round(p.total_memory / 2**30, 1),
                   cuda=torch.version.cuda, tf32_matmul=torch.backends.cuda.matmul.allow_tf32)
    return env


def _find(rows, system, n, w, batch):
    for r in rows:
        if (r["system"], r["N"], r["W"], r["batch"]) == (system, n, w, batch):
            return r
    return None


def derive(rows: list[dict], atol: float) -> None:
    """Speed-up and efficiency (strong: fixed N), weak efficiency (N / W fixed), flat columns."""
    for r in rows:
        base_system = "vit-1dev" if r["system"] == "vit-pipeline" else r["system"]
        one = _find(rows, base_system, r["N"], 1, r["batch"])
        r["speedup"] = one["p50_ms"] / r["p50_ms"] if one else None
        r["efficiency"] = r["speedup"] / r["W"] if one else None
        weak = _find(rows, base_system, r["N"] // r["W"], 1, r["batch"]) if r["N"] % r["W"] == 0 else None
        r["weak_efficiency"] = weak["p50_ms"] / r["p50_ms"] if weak else None
        for p in costmodel.PHASES:
            r[f"phase_{p}_ms"] = r.get("phases_ms", {}).get(p)
        r["bytes_broadcast"] = r["bytes"].get("broadcast")
        r["bytes_reduce"] = r["bytes"].get("reduce")
        r["logits_match"] = r["max_abs_diff"] <= atol


def _ratio(rows, a: tuple, b: tuple):
    """p50 of point a over p50 of point b, each (system, N, W, batch); None if either is missing."""
    ra, rb = _find(rows, *a), _find(rows, *b)
    return ra["p50_ms"] / rb["p50_ms"] if ra and rb else None


def headline(rows: list[dict], models: dict, *, pairs: list[dict] | None = None) -> dict:
    """The ratios issue 6 asks for, measured in this run (None where a point was not measured).
    The depth ratios come from the depth pair (N = 1, W = 1 and N = 2, W = 2 measured in one
    round-robin) when it was run, else from the sweep's points."""
    batches = sorted({r["batch"] for r in rows})
    b1 = batches[0] if batches else None
    lp, depth = "layerpar-collective", pairs or rows
    h: dict = {"depth_ratios_from": "depth pair (interleaved)" if pairs else "sweep points"}
    h["layerpar_depth_ratio"] = _ratio(depth, (lp, 2, 2, b1), (lp, 1, 1, b1))
    h["layerpar_depth_ratio_by_batch"] = {
        str(b): _ratio(depth, (lp, 2, 2, b), (lp, 1, 1, b)) for b in batches}
    os_ = "layerpar-object_store"
    h["layerpar_object_store_depth_ratio"] = _ratio(depth, (os_, 2, 2, b1), (os_, 1, 1, b1))
    h["vit_depth_ratio"] = _ratio(depth, ("vit-1dev", 2, 1, b1), ("vit-1dev", 1, 1, b1))
    if pairs:
        h["layerpar_depth_ratio_sweep_points"] = _ratio(rows, (lp, 2, 2, b1), (lp, 1, 1, b1))
    pipe, ref = "vit-pipeline", "reference-threads"
    pipe_ns = sorted({r["N"] for r in rows if r["system"] == pipe and r["W"] == 2})
    if pipe_ns:  # the pipeline's time over layerpar's
        h["layerpar_vs_pipeline_point"] = {"N": pipe_ns[-1], "W": 2, "batch": b1}
        by_n = {str(m): _ratio(rows, (pipe, m, 2, b1), (lp, m, 2, b1)) for m in pipe_ns}
        h["layerpar_vs_pipeline_speedup"] = by_n[str(pipe_ns[-1])]
        h["layerpar_vs_pipeline_speedup_by_n"] = by_n
    ref_ns = sorted({r["N"] for r in rows if r["system"] == ref and r["W"] == 2})
    if ref_ns:  # layerpar's time over reference-threads'
        h["layerpar_vs_reference_point"] = {"N": ref_ns[-1], "W": 2, "batch": b1}
        h["layerpar_vs_reference_ratio"] = _ratio(rows, (lp, ref_ns[-1], 2, b1), (ref, ref_ns[-1], 2, b1))
        h["layerpar_vs_reference_ratio_by_point"] = {
            f"N{m}_b{b}": _ratio(rows, (lp, m, 2, b), (ref, m, 2, b)) for m in ref_ns for b in batches}
    for key, field in (("costmodel_max_held_out_error", "max_abs_error_held_out_within_devices"),
                       ("costmodel_max_held_out_error_incl_oversubscribed", "max_abs_error_held_out")):
        h[key] = max((m[field] for m in models.values() if m[field] is not None), default=None)
    for system in ("paraformer-1gpu", "vit-1gpu", "paraformer-1gpu-graph", "vit-1gpu-graph"):
        key = "gpu_" + system.replace("-1gpu", "").replace("-", "_")
        for b in batches:
            for n in (16, 32):
                r = _ratio(rows, (system, n, 1, b), (system, 1, 1, b))
                if r is not None:
                    h[f"{key}_n{n}_vs_n1_b{b}"] = r
    checked = rows + (pairs or [])
    h["logits_match"] = all(r["logits_match"] for r in checked) if checked else None
    h["max_abs_diff"] = max((r["max_abs_diff"] for r in checked), default=None)
    h["pass"] = {k: (v <= bound if op == "<=" else v >= bound) for k, (op, bound) in TARGETS.items()
                 if (v := h.get(k)) is not None}
    return h


def json_safe(obj):
    """JSON-safe: NaN/inf become None, tuples lists, keys strings."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def write(rows: list[dict], *, cfg, settings: dict, preset: str, devices: int, gpu: bool,
          out_dir: str, command: str, duration_s: float, address: str | None,
          cluster: dict | None = None, skipped: list[dict] | None = None,
          pairs: list[dict] | None = None) -> dict:
    """Write the run directory; return the one-line JSON summary."""
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    run_dir = Path(out_dir) / f"scale-{preset}-{stamp}"
    suffix = 1
    while run_dir.exists():
        run_dir = Path(out_dir) / f"scale-{preset}-{stamp}-{suffix}"
        suffix += 1
    run_dir.mkdir(parents=True)
    derive(rows, settings["atol"])
    models = costmodel.fit_and_judge(rows, devices)
    serial = costmodel.fit_serial(rows) if any(r["system"] == "vit-1dev" for r in rows) else {}
    pairs = pairs or []
    derive(pairs, settings["atol"])
    heads = headline(rows, models, pairs=pairs)
    env = environment(gpu=gpu, devices=devices, command=command, address=address, cluster=cluster)
    result = json_safe({"format": "layerpar-scale-v1", "preset": preset, "run_dir": str(run_dir),
                     "created": dt.datetime.now().isoformat(timespec="seconds"),
                     "duration_s": round(duration_s, 1), "environment": env,
                     "model": cfg.to_dict()["model"], "settings": settings, "targets": TARGETS,
                     "headline": heads, "cost_model": models, "serial_vit_fit": serial,
                     "skipped": skipped or [], "rows": rows, "depth_pair": pairs})
    with open(run_dir / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for r in rows:
            writer.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in CSV_COLUMNS})
    (run_dir / "results.json").write_text(json.dumps(result, indent=1))
    plots = write_plots(rows, run_dir, gpu=gpu) if settings.get("plots", True) else []
    (run_dir / "report.md").write_text(markdown(result, plots))
    summary = {"run_dir": str(run_dir), "preset": preset, "points": len(rows),
               "skipped": len(skipped or []),
               "duration_s": round(duration_s, 1)}
    summary.update({k: v for k, v in heads.items() if not isinstance(v, dict)})
    summary["pass"] = heads["pass"]
    return json_safe(summary)
