"""PNG plots of a scaling run (matplotlib, Agg backend: no display needed).

    latency_vs_n.png        p50 latency vs N, one line per (system, W), one panel per batch size
    speedup_vs_w.png        strong-scaling speed-up T(1)/T(W) at the largest N, with the ideal line
    measured_vs_predicted.png   the cost model against every layerpar point (fit and held out)
"""

from __future__ import annotations

from pathlib import Path

STYLE = {"layerpar-collective": "tab:blue", "layerpar-object_store": "tab:cyan",
         "reference-threads": "tab:green", "vit-1dev": "tab:red", "vit-pipeline": "tab:orange",
         "paraformer-1gpu": "tab:blue", "vit-1gpu": "tab:red", "paraformer-1gpu-graph": "tab:purple",
         "vit-1gpu-graph": "tab:brown"}


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _label(ax, xlabel: str, ylabel: str, title: str, **grid) -> None:
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, alpha=0.3, **grid)
    ax.legend(fontsize=7)


def _save(plt, fig, run_dir: Path, name: str) -> str:
    fig.tight_layout()
    fig.savefig(run_dir / name, dpi=110)
    plt.close(fig)
    return name


def write_plots(rows: list[dict], run_dir: Path, *, gpu: bool) -> list[str]:
    """Write the plots; returns their file names (none when matplotlib is missing)."""
    plt = _pyplot()
    if plt is None or not rows:
        return []
    names = [_latency_vs_n(plt, rows, run_dir, gpu)]
    if not gpu:
        names.append(_speedup_vs_w(plt, rows, run_dir))
        if any(r.get("predicted_ms") is not None for r in rows):
            names.append(_measured_vs_predicted(plt, rows, run_dir))
    return [n for n in names if n]


def _latency_vs_n(plt, rows, run_dir, gpu) -> str:
    batches = sorted({r["batch"] for r in rows})
    fig, axes = plt.subplots(1, len(batches), figsize=(6 * len(batches), 4.5), squeeze=False)
    for ax, b in zip(axes[0], batches, strict=True):
        lines = sorted({(r["system"], r["W"]) for r in rows if r["batch"] == b})
        for system, w in lines:
            pts = sorted((r["N"], r["p50_ms"], r["oversubscribed"]) for r in rows
                         if r["batch"] == b and r["system"] == system and r["W"] == w)
            label = system if gpu else f"{system} W={w}" + (" (oversubscribed)" if pts[0][2] else "")
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label,
                    color=STYLE.get(system), linestyle=["-", "--", ":", "-."][min(w - 1, 3)] if w < 5
                    else "-.", alpha=0.9)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        _label(ax, "branches N (serial ViT: N x depth blocks)", "p50 latency (ms)", f"batch {b}",
               which="both")
    return _save(plt, fig, run_dir, "latency_vs_n.png")


def _speedup_vs_w(plt, rows, run_dir) -> str | None:
    batches = sorted({r["batch"] for r in rows})
    n_max = max(r["N"] for r in rows)
    ws = sorted({r["W"] for r in rows})
    if len(ws) < 2:
        return None
    fig, axes = plt.subplots(1, len(batches), figsize=(6 * len(batches), 4.5), squeeze=False)
    for ax, b in zip(axes[0], batches, strict=True):
        for system in sorted({r["system"] for r in rows} - {"vit-1dev"}):
            pts = sorted((r["W"], r["speedup"]) for r in rows if r["system"] == system
                         and r["N"] == n_max and r["batch"] == b and r.get("speedup"))
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=system,
                        color=STYLE.get(system))
        ax.plot(ws, ws, color="gray", linestyle=":", label="ideal")
        cores = min((r["W"] for r in rows if r["oversubscribed"]), default=None)
        if cores:
            ax.axvspan(cores - 0.5, max(ws) + 0.5, color="gray", alpha=0.1,
                       label="oversubscribed (W > cores)")
        _label(ax, "workers W", f"speed-up T(W=1)/T(W) at N={n_max}", f"strong scaling, batch {b}")
    return _save(plt, fig, run_dir, "speedup_vs_w.png")


def _measured_vs_predicted(plt, rows, run_dir) -> str:
    fig, ax = plt.subplots(figsize=(5.5, 5))
    pts = [r for r in rows if r.get("predicted_ms") is not None]
    for fit, marker, label in ((True, "o", "fitted on"), (False, "x", "held out")):
        sel = [r for r in pts if bool(r.get("fit")) == fit]
        for over in (False, True):
            sub = [r for r in sel if r["oversubscribed"] == over]
            if sub:
                ax.scatter([r["p50_ms"] for r in sub], [r["predicted_ms"] for r in sub],
                           marker=marker, color="tab:red" if over else "tab:blue",
                           label=label + (" (oversubscribed)" if over else ""))
    lo = min(min(r["p50_ms"], r["predicted_ms"]) for r in pts) * 0.8
    hi = max(max(r["p50_ms"], r["predicted_ms"]) for r in pts) * 1.2
    ax.plot([lo, hi], [lo, hi], color="gray")
    ax.fill_between([lo, hi], [lo * 0.75, hi * 0.75], [lo * 1.25, hi * 1.25], color="gray",
                    alpha=0.15, label="within 25%")
    ax.set_xscale("log")
    ax.set_yscale("log")
    _label(ax, "measured p50 (ms)", "cost model (ms)", "layerpar: measured vs predicted", which="both")
    return _save(plt, fig, run_dir, "measured_vs_predicted.png")
