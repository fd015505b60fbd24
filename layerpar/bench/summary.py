"""report.md of a scaling run: what was measured, where, how, and how to read it."""

from __future__ import annotations


def _f(v, fmt="{:.3g}"):
    return "-" if v is None else fmt.format(v)


def _table(header: list[str], rows: list[list]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


NOTES = [
    "Every system uses the same blocks and the same seeded weights; the serial ViT stacks "
    "N x branch_depth of them, so it has the same parameter count as the Para-Former with N branches.",
    "`reference-threads` runs exactly the model code a layerpar worker runs (fused branch stacks, "
    "CLS-only last block) in one process with W threads: its difference to layerpar is the runtime.",
    "Every CLS-pooled model (Para-Former branches and the serial ViT alike) computes only the CLS "
    "row in its last block: the same outputs, less work.",
    "`vit-pipeline` latency is timed inside its process group (rank 0's start to the last stage's "
    "logits): no driver dispatch is counted for it, which favours the baseline. layerpar latencies "
    "are end to end from the driver, dispatch included.",
    "One CPU worker = one torch thread = one device. Rows marked oversubscribed have more workers "
    "than devices (cores): workers time-share, so they do not show what W devices would give.",
    "The driver process shares the same cores as the workers.",
]


def _gpu_table(rows: list[dict]) -> list[str]:
    """Latency vs N on one GPU, and its growth T(N)/T(1), per system and batch."""
    gpu = [r for r in rows if "1gpu" in r["system"]]
    if not gpu:
        return []
    cols = sorted({(r["system"], r["batch"]) for r in gpu}, key=lambda c: (c[1], c[0]))
    p50 = {(r["system"], r["batch"], r["N"]): r["p50_ms"] for r in gpu}
    body = []
    for n in sorted({r["N"] for r in gpu}):
        cells = []
        for s, b in cols:
            t, t1 = p50.get((s, b, n)), p50.get((s, b, 1))
            cells.append("-" if t is None else f"{t:.3f} ({t / t1:.2f}x)" if t1 else f"{t:.3f}")
        body.append([n] + cells)
    head = ["N"] + [f"{s} b{b}: ms (vs N=1)" for s, b in cols]
    return ["One GPU: p50 latency in ms and its growth over N = 1 (the serial ViT stacks "
            "N x depth blocks; the Para-Former runs its N branches as one fused computation; "
            "`-graph`: replayed from a CUDA graph, i.e. without Python and launch overhead).", "",
            _table(head, body), ""]


def _phases(r: dict) -> str:
    """layerpar's median phases in ms, embed/broadcast/compute/reduce/head/dispatch ('' if none)."""
    if not r.get("phases_ms"):
        return ""
    return "/".join(_f(r.get(f"phase_{p}_ms"), "{:.2f}") for p in
                    ("embed", "broadcast", "compute", "reduce", "head", "dispatch"))


def _setup_lines(result: dict) -> list[str]:
    """The title and where, how and on what the run measured."""
    env, m, h = result["environment"], result["model"], result["headline"]
    cluster = []
    if env.get("cluster"):
        cluster = [f"- Ray cluster at `{env['ray_address']}`: {env['cluster']['nodes']} node(s), "
                   f"resources {env['cluster']['resources']}"
                   + (" -- **SIMULATED: several Ray nodes on one machine** (placement is real, "
                      "speed-ups are not)" if env.get("cluster_simulated") else "")]
    return [f"# Scaling run `{result['preset']}`", "",
            f"- created {result['created']}, {result['duration_s']} s",
            f"- command: `{env['command']}`",
            f"- device: {env['device']}, devices available to the workers: {env['devices']}"
            + (f", GPU {env.get('gpu_model')}" if env.get("gpu_model") else ""),
            *cluster,
            f"- CPU: {env['cpu_model']} ({env['cpu_count']} cores); torch {env['torch']}, "
            f"ray {env['ray'] or 'not installed'}; Python {env['python']}",
            f"- blocks: width {m['dim']}, {m['heads']} heads, MLP {m['mlp_dim']}, "
            f"{m['image_size']}x{m['image_size']} input, patch {m['patch_size']} -> "
            f"{(m['image_size'] // m['patch_size']) ** 2 + 1} tokens, branch depth "
            f"{m['branch_depth']}, style {m['style']}, pool {m['pool']}",
            f"- precision: {result['settings'].get('dtype', 'float32')}"
            + (" (TF32 matmuls)" if result["settings"].get("tf32") else ""),
            f"- all logits equal the single-process model's: **{h.get('logits_match')}** "
            f"(max |diff| {_f(h.get('max_abs_diff'), '{:.2e}')})", ""]


def _headline_lines(result: dict) -> list[str]:
    """The headline ratios against their targets, then the points they were taken at."""
    h, targets = result["headline"], result["targets"]
    hl = []
    for k, v in h.items():
        if isinstance(v, (dict, list, str)) or v is None or k in ("logits_match", "max_abs_diff"):
            continue
        t = targets.get(k)
        hl.append([k, _f(v, "{:.3f}"), f"{t[0]} {t[1]}" if t else "",
                   {True: "yes", False: "**no**"}.get(h["pass"].get(k), "")])
    lines = ["## Headline", "", _table(["ratio", "value", "target", "met"], hl), ""]
    for k in ("depth_ratios_from", "layerpar_vs_pipeline_point", "layerpar_vs_reference_point"):
        if k in h:
            lines.append(f"- {k}: {h[k]}")
    return lines + [""]


def _depth_pair_lines(pairs: list[dict]) -> list[str]:
    if not pairs:
        return []
    return ["## Depth pair", "",
            "N = 1 on W = 1 and N = 2 on W = 2 (and the serial ViT 1 and 2 blocks deep) measured "
            "in one round-robin, so that the machine's drift between sweep points does not enter "
            "the depth ratios. p50/p95 in ms; spread = IQR / p50.", "",
            _table(["system", "N", "W", "B", "p50", "p95", "spread", "reps", "phases"],
                   [[r["system"], r["N"], r["W"], r["batch"], _f(r["p50_ms"], "{:.2f}"),
                     _f(r["p95_ms"], "{:.2f}"), _f(r["spread"], "{:.2f}"), r["reps"], _phases(r)]
                    for r in pairs]), ""]


def _points_lines(rows: list[dict]) -> list[str]:
    tab = [[r["system"], r["N"], f"{r['W']}*" if r["oversubscribed"] else r["W"], r["batch"],
            _f(r["p50_ms"], "{:.2f}"), _f(r["p95_ms"], "{:.2f}"), _f(r["spread"], "{:.2f}"),
            r["reps"], _f(r["throughput_sps"], "{:.1f}"), _f(r.get("speedup"), "{:.2f}"),
            _f(r.get("efficiency"), "{:.2f}"), _f(r.get("weak_efficiency"), "{:.2f}"), _phases(r),
            _f(r.get("predicted_ms"), "{:.2f}") + (" (fit)" if r.get("fit") else ""),
            _f(r.get("pred_error"), "{:+.0%}"), _f(r["max_abs_diff"], "{:.1e}")] for r in rows]
    return ["## Points", "",
            "p50/p95 in ms; spread = IQR / p50; S = T(W=1)/T(W) (pipeline: vs vit-1dev); "
            "E = S/W; weak = T(N/W, W=1)/T(N, W); phases are layerpar's medians in ms "
            "(embed/broadcast/compute/reduce/head/dispatch); pred = cost model (fit = fitted on).", "",
            _table(["system", "N", "W", "B", "p50", "p95", "spread", "reps", "samples/s", "S", "E",
                    "weak", "phases", "pred", "err", "|diff|"], tab),
            "", "`W*`: oversubscribed (more workers than devices).", ""]


def _cost_model_lines(result: dict) -> list[str]:
    """The fitted coefficients, the extrapolation grid of each model and the serial ViT's line."""
    if not result["cost_model"]:
        return []
    coefficients = ("T_embed", "t_branch", "t_broadcast", "r0", "r1", "d0", "d1", "T_head", "kappa")
    cm = [[key] + [_f(mdl["coefficients_ms"][k], "{:.3f}") for k in coefficients]
          + [_f(mdl["max_abs_error_held_out_within_devices"], "{:.0%}"),
             _f(mdl["max_abs_error_held_out"], "{:.0%}")] for key, mdl in result["cost_model"].items()]
    lines = ["## Cost model", "",
             "`T(W) = T_embed + ceil(N/W)*t_branch + t_broadcast + t_reduce + t_dispatch + T_head`, "
             "t_reduce = r0 + r1*log2(W), t_dispatch = d0 + d1*(W-1); with W workers on C devices "
             "embed and compute take ceil(W/C) times longer; with W >= 2 the branch compute is "
             "multiplied by kappa (workers sharing a host slow each other). Coefficients in ms.", "",
             _table(["model", "T_embed", "t_branch", "t_bcast", "r0", "r1", "d0", "d1", "T_head",
                     "kappa", "max err held out", "incl. oversubscribed"], cm), "",
             "Extrapolation (one device per worker), predicted ms:", ""]
    for key, mdl in result["cost_model"].items():
        ex = mdl["extrapolation"]
        ns, ws = sorted({e["N"] for e in ex}), sorted({e["W"] for e in ex})
        grid = {(e["N"], e["W"]): e["predicted_ms"] for e in ex}
        lines += [f"`{key}`", "", _table(["N \\ W"] + [str(w) for w in ws],
                                          [[n] + [_f(grid.get((n, w)), "{:.2f}") for w in ws]
                                           for n in ns]), ""]
    for b, s in result.get("serial_vit_fit", {}).items():
        lines.append(f"- serial ViT, one device, batch {b}: T(L) = {s['a_ms']:.2f} + "
                     f"L x {s['t_block_ms']:.2f} ms (L = blocks), e.g. L = 128: "
                     f"{s['predicted_ms_by_blocks']['128']:.1f} ms")
    return lines + [""]


def markdown(result: dict, plots: list[str]) -> str:
    lines = _setup_lines(result) + _headline_lines(result) + _depth_pair_lines(result.get("depth_pair"))
    lines += _gpu_table(result["rows"])
    for p in plots:
        lines += [f"![{p}]({p})", ""]
    lines += _points_lines(result["rows"]) + _cost_model_lines(result)
    if result.get("skipped"):
        lines += ["## Points not measured", ""] + [
            f"- {k['system']} N={k['N']} W={k['W']}: {k['reason']}" for k in result["skipped"]] + [""]
    lines += ["## How to read this", ""] + [f"- {n}" for n in NOTES] + [""]
    return "\n".join(lines)
