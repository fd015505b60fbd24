"""A training sweep's outputs (layerpar R x W meshes vs DDP vs one process), written into out_dir:

    results.csv                 one row per point, flat columns
    results.json                meta, model shape, rows, the cost model summary, the headline
    report.md                   per-D tables, bytes ratios, the cost model and its 64-device picks
    samples_by_devices.png      samples/s over D per system / layerpar W (when matplotlib imports)
    predicted_vs_measured.png   the cost model against every point (fit and held out)
"""

from __future__ import annotations

import csv
import json
from dataclasses import asdict
from pathlib import Path

from layerpar.bench.report import json_safe
from layerpar.bench.train_costmodel import ModelShape, layout_name

FIRST_COLUMNS = ["system", "layout", "R", "W", "D", "devices", "backend", "step_ms", "samples_per_s",
                 "compute_ms", "collectives_ms", "bytes", "steps", "fit", "predicted_ms", "pred_error"]


def _f(v, fmt="{:.3g}") -> str:
    return "-" if v is None else fmt.format(v)


def _table(header: list[str], body: list[list]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(str(c) for c in r) + " |" for r in body), ""]


def _flat(row: dict) -> dict:
    """One level of nesting flattened as key.sub; lists as JSON."""
    out = {}
    for k, v in row.items():
        if isinstance(v, dict):
            out.update({f"{k}.{s}": (json.dumps(json_safe(x)) if isinstance(x, (dict, list)) else x)
                        for s, x in v.items()})
        else:
            out[k] = json.dumps(json_safe(v)) if isinstance(v, (list, tuple)) else v
    return out


def derive(rows: list[dict], shape: ModelShape) -> None:
    """layout and samples_per_s on each row (in place)."""
    for r in rows:
        r.setdefault("layout", layout_name(r))
        if r.get("samples_per_s") is None and r.get("step_ms"):
            r["samples_per_s"] = r.get("batch", shape.batch) / r["step_ms"] * 1e3


def _d(r: dict) -> int:
    return 1 if r["system"] == "one-process" else int(r.get("D") or r["R"] * r["W"])


def headline(rows: list[dict], model_summary: dict | None) -> dict:
    lp = [r for r in rows if r["system"] == "layerpar" and r.get("samples_per_s")]
    top = {d: max((r for r in lp if _d(r) == d), key=lambda r: r["samples_per_s"])
           for d in sorted({_d(r) for r in lp})}  # the fastest layerpar layout at each D
    best = {d: {k: b[k] for k in ("layout", "samples_per_s", "step_ms")} for d, b in top.items()}
    ddp = {_d(r): r for r in rows if r["system"] == "ddp" and r.get("samples_per_s")}
    fewest = {d: min(r["bytes"] for r in lp if _d(r) == d) for d in top}  # the widest layout's
    ratio = {d: r["bytes"] / fewest[d] if fewest.get(d) else None for d, r in ddp.items()}
    ddp = {d: r["samples_per_s"] for d, r in ddp.items()}
    ms = model_summary or {}
    ex = ms.get("extrapolation") or {}
    return {"best_layerpar": best, "ddp_samples_per_s": ddp, "bytes_ratio_ddp_over_layerpar": ratio,
            "max_abs_error_held_out": ms.get("max_abs_error_held_out"),
            "max_abs_error_fit": ms.get("max_abs_error_fit"),
            "loo_max_abs_error": ms.get("loo_max_abs_error"),
            "picks": ex.get("picks"), "picks_too_close": ex.get("close") or None}


def _per_d(rows: list[dict]) -> list[str]:
    one = next((r["samples_per_s"] for r in rows if r["system"] == "one-process"
                and r.get("samples_per_s")), None)
    out = []
    for d in sorted({_d(r) for r in rows}):
        at = sorted((r for r in rows if _d(r) == d), key=lambda r: (r["system"], -r.get("W", 1)))
        ddp = next((r.get("bytes") for r in at if r["system"] == "ddp"), None)
        body = [[r["system"], r["layout"], _f(r.get("samples_per_s"), "{:.1f}"),
                 _f(r.get("step_ms"), "{:.2f}"), _f(r.get("compute_ms"), "{:.2f}"),
                 _f(r.get("collectives_ms"), "{:.2f}"), _f(r.get("bytes"), "{:,.0f}"),
                 _f(ddp / r["bytes"] if ddp and r.get("bytes") else None, "{:.2f}"),
                 _f(r["samples_per_s"] / one if one and r.get("samples_per_s") else None, "{:.2f}x"),
                 _f(r.get("predicted_ms"), "{:.2f}"), _f(r.get("pred_error"), "{:+.1%}"),
                 "fit" if r.get("fit") else (f"same features as {r['same_features_as']}"
                                             if r.get("same_features_as") else "held out")] for r in at]
        devices = sorted({r.get("devices") for r in at if r.get("devices")})
        out += [f"### D = {d} ranks" + (f" on {'/'.join(map(str, devices))} devices" if devices else ""), "",
                *_table(["system", "layout", "samples/s", "step ms", "compute ms", "collectives ms",
                         "bytes/step (counted)", "DDP bytes / this", "vs one-process", "predicted ms",
                         "error", "cost model"], body)]
    return out


def _cost_model(ms: dict) -> list[str]:
    c = ms["coefficients"]
    out = ["## Cost model", "", "T_ms = kappa s (a + t_rep f_rep + t_br f_br) + alpha s steps + bytes / beta "
           "(s: ranks per core when time-shared; kappa = 1 for one process). Non-negative least "
           "squares on relative residuals, fitted on the corners: a, t_rep, t_br on one process and "
           "its calibration points (half the branches, half the rows), kappa on the multi-rank points' "
           "compute, alpha and beta on their collective time.", "",
           *_table(["a ms", "t_rep ms", "t_br ms", "kappa", "alpha ms/step", "beta bytes/ms",
                    "beta Gbit/s"],
                   [[_f(c["a_ms"]), _f(c["t_rep_ms"]), _f(c["t_br_ms"]), _f(c.get("kappa")),
                     _f(c["alpha_ms"]), _f(c["beta_bytes_per_ms"]), _f(c["beta_gbit_s"])]]),
           "Fit points: " + ", ".join(f"{p['layout']}@D{p['D']}" for p in ms["fit_points"]) + ".",
           "Held out: " + (", ".join(f"{p['layout']}@D{p['D']}" for p in ms["held_out_points"])
                           or "none") + ".",
           *([("Not held out (the same features as a fit point, so predicted as it is): "
               + ", ".join(f"{p['layout']}@D{p['D']} = {p['same_features_as']}"
                           for p in ms["same_features_points"]) + ".")]
             if ms.get("same_features_points") else []), "",
           "Errors of this run, side by side (max |predicted / measured - 1|):", "",
           f"- on the fit points: {_f(ms.get('max_abs_error_fit'), '{:.1%}')}",
           f"- leave-one-out (each multi-rank point from a model fitted on all the others): "
           f"{_f(ms['loo_max_abs_error'], '{:.1%}')}",
           f"- held out: {_f(ms['max_abs_error_held_out'], '{:.1%}')}"
           + (f" ({ms['held_out_note']})" if ms.get("held_out_note") else ""), ""]
    out += _extrapolation(ms.get("extrapolation"), "")
    ref = ms.get("extrapolation_reference")
    if ref:
        out += _extrapolation(ref, f", the reference configuration: t_rep {_f(ref['t_rep_ms'], '{:.0f}')} ms "
                                   f"and t_br {_f(ref['t_br_ms'], '{:.0f}')} ms, calibrated on its DDP "
                                   f"compute at D = 2 ({_f(ref['calibrated_on_ms'], '{:.0f}')} ms, one "
                                   "step) and split as its multiply-adds")
    return out


def _extrapolation(ex: dict | None, what: str) -> list[str]:
    if not ex:
        return []
    close = ex.get("close") or {}
    return [f"### Extrapolation to {ex['devices']} devices ({ex['backend']}, one device per rank, "
            f"beta set to the link rate, alpha kept{what})", "",
            *_table(["Gbit/s", "layout", "predicted ms", "compute", "latency", "bandwidth",
                     "samples/s", "bytes/step", "pick"],
                    [[_f(r["rate_gbit"], "{:g}"), r["layout"], _f(r["predicted_ms"], "{:.2f}"),
                      _f(r["compute_ms"], "{:.2f}"), _f(r["latency_ms"], "{:.2f}"),
                      _f(r["bandwidth_ms"], "{:.2f}"), _f(r["samples_per_s"], "{:.0f}"),
                      _f(r["bytes"], "{:,.0f}"), "**pick**" if r["picked"] else ""]
                     for r in ex["rows"]]),
            "Picks: " + ", ".join(f"{k} Gbit/s -> {v}" + (f" ({close[k]})" if k in close else "")
                                  for k, v in ex["picks"].items()) + ".", ""]


def markdown(rows, shape, ms, meta, heads, plots) -> str:
    out = ["# Training: layerpar meshes vs DDP vs one process", "",
           "Bytes *counted* are what the collectives' payloads add up to by the ring rules (every rank's "
           "largest); bytes *measured* are what a shaped link's qdisc actually sent (the slow-link "
           "section only).", "",
           f"- command: `{meta.get('command')}`", f"- machine: {meta.get('machine')}",
           f"- duration: {_f(meta.get('duration_s'), '{:.0f}')} s", "",
           *_table(list(asdict(shape)) + ["params"], [[*asdict(shape).values(), shape.params]]),
           "## Per device count", "", *_per_d(rows), "## Bytes per step: DDP / layerpar", "",
           *_table(["D", "fastest layerpar layout", "DDP samples/s",
                    "DDP bytes / fewest layerpar bytes (counted)"],
                   [[d, b["layout"], _f(heads["ddp_samples_per_s"].get(d), "{:.1f}"),
                     _f(heads["bytes_ratio_ddp_over_layerpar"].get(d), "{:.2f}")]
                    for d, b in heads["best_layerpar"].items()])]
    if meta.get("reference"):
        out += ["## Reference configuration: bytes per step", "",
                *_table(["key", "value"], [[k, v] for k, v in meta["reference"].items()])]
    link = meta.get("link") or {}
    if "skipped" in link:
        out += ["## Slow link", "", f"Not run: {link['skipped']}", ""]
    elif link:
        model = next(iter(link.values())).get("model", "")
        out += ["## Slow link: two ranks in two network namespaces, a tbf-shaped veth between them", "",
                f"Model: {model}.", "",
                *_table(["rate", "layerpar 1x2 ms", "layerpar 2x1 ms", "DDP ms", "DDP / layerpar 1x2"], [
                    [k, _f(v.get("layerpar_ms"), "{:.2f}"), _f(v.get("layerpar_2x1_ms"), "{:.2f}"),
                     _f(v.get("ddp_ms"), "{:.2f}"), _f(v.get("ratio"), "{:.2f}")] for k, v in link.items()]),
                "Bytes per step and rank: counted (ring rules) and measured (the rank's veth end, tc).", "",
                *_table(["rate", "layerpar 1x2 counted", "measured", "layerpar 2x1 counted", "measured",
                         "DDP counted", "measured"], [
                    [k, *(_f(v.get(f"{n}{m}"), "{:,.0f}") for n in ("layerpar_", "layerpar_2x1_", "ddp_")
                          for m in ("bytes", "wire_bytes"))] for k, v in link.items()])]
    out += _cost_model(ms) if ms else ["No cost model was fitted.", ""]
    out += [f"![{p}]({p})" for p in plots] + [""]
    out += ["## Read honestly", ""] + [f"- {n}" for n in meta.get("notes", [])] + [""]
    return "\n".join(out)


def _plots(rows: list[dict], out: Path) -> list[str]:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    fig, ax = plt.subplots(figsize=(6, 4))
    series: dict[str, list] = {}
    for r in rows:
        if r.get("samples_per_s"):
            key = f"layerpar Rx{r['W']}" if r["system"] == "layerpar" else r["system"]
            series.setdefault(key, []).append((_d(r), r["samples_per_s"]))
    for key, pts in sorted(series.items()):
        xs, ys = zip(*sorted(pts), strict=True)
        ax.plot(xs, ys, "o--" if key == "ddp" else "o-", label=key)
    ds = sorted({x for p in series.values() for x, _ in p})
    ax.set_xscale("log", base=2)
    ax.set_xticks(ds, [str(d) for d in ds])
    ax.set(xlabel="ranks D", ylabel="samples/s", title="training throughput")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    names = ["samples_by_devices.png"]
    fig.tight_layout()
    fig.savefig(out / names[0], dpi=110)
    plt.close(fig)
    judged = [r for r in rows if r.get("predicted_ms") is not None and r.get("step_ms")]
    if judged:
        fig, ax = plt.subplots(figsize=(5, 5))
        for flag, mark in ((True, "o"), (False, "x")):
            pts = [(r["step_ms"], r["predicted_ms"]) for r in judged if bool(r.get("fit")) == flag]
            if pts:
                ax.scatter(*zip(*pts, strict=True), marker=mark, label="fit" if flag else "held out")
        top = max(max(r["step_ms"], r["predicted_ms"]) for r in judged) * 1.05
        ax.plot([0, top], [0, top], "k:", lw=1)
        ax.set(xlabel="measured step ms (p50)", ylabel="predicted ms", title="cost model")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / "predicted_vs_measured.png", dpi=110)
        plt.close(fig)
        names.append("predicted_vs_measured.png")
    return names


def write(rows: list[dict], *, shape: ModelShape, model_summary: dict | None, out_dir, meta: dict
          ) -> dict:
    """Write the five files (plots when matplotlib imports) into out_dir; return the summary."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    derive(rows, shape)
    heads = headline(rows, model_summary)
    flat = [_flat(r) for r in rows]
    columns = [c for c in FIRST_COLUMNS if any(c in f for f in flat)]
    columns += [k for k in dict.fromkeys(k for f in flat for k in f) if k not in columns]
    with open(out / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows({k: ("" if f.get(k) is None else f.get(k)) for k in columns} for f in flat)
    (out / "results.json").write_text(json.dumps(json_safe(
        {"format": "layerpar-train-v1", "meta": meta, "shape": {**asdict(shape), "params": shape.params},
         "rows": rows, "cost_model": model_summary, "headline": heads}), indent=1, default=str))
    plots = _plots(rows, out)
    (out / "report.md").write_text(markdown(rows, shape, model_summary, meta, heads, plots))
    files = {n: str(out / n) for n in ("results.csv", "results.json", "report.md", *plots)}
    return json_safe({"out_dir": str(out), "files": files, "points": len(rows), **heads})
