"""The cost model of a layer-parallel forward, fitted from measured phases:

    T(N, W) = T_embed + ceil(N / W) * t_branch + t_broadcast + t_reduce(W) + t_dispatch(W) + T_head

- T_embed: every worker embeds the batch (replicated); it also holds the fixed per-call cost of the
  branch stack (the intercept of compute vs branches per worker).
- t_branch: one branch, fitted as the slope of the worker's compute time over ceil(N / W).
- t_broadcast: the driver's one put of the batch (independent of W).
- t_reduce(W) = r0 + r1 * log2(W): a tree/ring reduce of the (B, D) partial sums.
- t_dispatch(W) = d0 + d1 * (W - 1): the driver issues one call per worker and waits once.
- T_head: LayerNorm + Linear on (B, D).

More workers than devices (here: CPU cores) time-share: with W workers on C devices every worker's
embed and compute take ceil(W / C) times longer. Workers that each own a device can still slow each
other where they share a host (memory bandwidth, caches, cores that are hyperthreads of one another):
with W >= 2 the branch compute is multiplied by `kappa`, fitted on the multi-worker corner points
(1 when none was measured). Extrapolations assume one device per worker (C = W) and keep kappa.

Each (system, batch) group is fitted on its corner points (N in {min, max}, W within the devices)
and judged on every other point: the held-out error is what a report quotes.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

PHASES = ("embed", "broadcast", "compute", "reduce", "head", "dispatch")


def oversubscription(workers: int, devices: int) -> int:
    """How many workers share one device (1 when every worker has its own)."""
    return math.ceil(workers / max(1, devices))


@dataclass(frozen=True)
class CostModel:
    """Coefficients in milliseconds."""

    T_embed: float
    t_branch: float
    t_broadcast: float
    r0: float
    r1: float
    d0: float
    d1: float
    T_head: float
    kappa: float = 1.0

    def phases(self, num_branches: int, workers: int, devices: int | None = None) -> dict[str, float]:
        """Predicted milliseconds per term; devices=None means one device per worker."""
        s = oversubscription(workers, devices or workers)
        return {"embed": self.T_embed * s,
                "compute": math.ceil(num_branches / workers) * self.t_branch * s
                * (self.kappa if workers > 1 else 1.0),
                "broadcast": self.t_broadcast,
                "reduce": max(0.0, self.r0 + self.r1 * math.log2(workers)),
                "dispatch": max(0.0, self.d0 + self.d1 * (workers - 1)),
                "head": self.T_head}

    def predict(self, num_branches: int, workers: int, devices: int | None = None) -> float:
        return sum(self.phases(num_branches, workers, devices).values())

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


def _line(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Least-squares intercept and slope; slope 0 when the xs do not vary."""
    if len(set(xs)) < 2:
        return float(np.mean(ys)), 0.0
    a = np.stack([np.ones(len(xs)), np.asarray(xs, dtype=float)], axis=1)
    (c0, c1), *_ = np.linalg.lstsq(a, np.asarray(ys, dtype=float), rcond=None)
    return float(c0), float(c1)


def fit(points: list[dict], devices: int) -> CostModel:
    """Fit from points with keys N, W and phases_ms (median milliseconds per phase)."""
    if not points:
        raise ValueError("the cost model needs at least one measured point to fit")
    s = [oversubscription(p["W"], devices) for p in points]
    ph = [p["phases_ms"] for p in points]
    k = [math.ceil(p["N"] / p["W"]) * si for p, si in zip(points, s, strict=True)]
    ys = [q.get("compute", 0.0) for q in ph]
    single = [i for i, p in enumerate(points) if p["W"] == 1]
    if len({k[i] for i in single}) < 2:  # the slope needs two single-worker sizes: use every point
        single = list(range(len(points)))
    ks, yk = [k[i] for i in single], [ys[i] for i in single]
    c_fixed, t_branch = _line(ks, yk)
    if c_fixed < 0 or t_branch <= 0:  # noise: no fixed part, a line through the origin
        c_fixed = 0.0
        t_branch = float(np.dot(ks, yk) / np.dot(ks, ks))
    shared = [(ys[i] - c_fixed) / (k[i] * t_branch) for i, p in enumerate(points)
              if p["W"] > 1 and i not in single and t_branch > 0]
    kappa = float(np.mean(shared)) if shared else 1.0
    embed = float(np.mean([q.get("embed", 0.0) / si for q, si in zip(ph, s, strict=True)]))
    r0, r1 = _line([math.log2(p["W"]) for p in points], [q.get("reduce", 0.0) for q in ph])
    d0, d1 = _line([p["W"] - 1 for p in points], [q.get("dispatch", 0.0) for q in ph])
    return CostModel(T_embed=embed + max(0.0, c_fixed), t_branch=t_branch,
                     t_broadcast=float(np.mean([q.get("broadcast", 0.0) for q in ph])),
                     r0=r0, r1=r1, d0=d0, d1=d1,
                     T_head=float(np.mean([q.get("head", 0.0) for q in ph])), kappa=kappa)


def fit_and_judge(rows: list[dict], devices: int) -> dict:
    """Fit one model per (system, batch) over layerpar rows; set predicted_ms / pred_error / fit on
    each row (in place) and return the models with their held-out errors."""
    models = {}
    groups: dict[tuple[str, int], list[dict]] = {}
    for r in rows:
        if r["system"].startswith("layerpar-") and r.get("phases_ms"):
            groups.setdefault((r["system"], r["batch"]), []).append(r)
    for (system, batch), group in sorted(groups.items()):
        ns = sorted({r["N"] for r in group})
        # fitted on the corner points: the smallest and largest N, with W within the devices
        train = [r for r in group if r["W"] <= devices and r["N"] in (ns[0], ns[-1])]
        if len(train) < 2:  # too few corners measured: fit on every point (no held-out error)
            train = group
        model = fit(train, devices)
        held = []
        for r in group:
            r["fit"] = r in train
            r["predicted_ms"] = model.predict(r["N"], r["W"], devices)
            r["pred_error"] = (r["predicted_ms"] - r["p50_ms"]) / r["p50_ms"]
            if not r["fit"]:
                held.append(r)
        within = [abs(r["pred_error"]) for r in held if r["W"] <= devices]
        models[f"{system}/b{batch}"] = {
            "system": system, "batch": batch, "coefficients_ms": model.to_dict(),
            "fit_points": [[r["N"], r["W"]] for r in train],
            "held_out_points": [[r["N"], r["W"]] for r in held],
            "max_abs_error_held_out": max((abs(r["pred_error"]) for r in held), default=None),
            "max_abs_error_held_out_within_devices": max(within, default=None),
            "extrapolation": extrapolate(model),
        }
    return models


def extrapolate(model: CostModel, *, branch_counts=(8, 16, 32, 64), max_workers: int = 64
                ) -> list[dict]:
    """Predicted latency with one device per worker, W = 1, 2, 4, ... up to min(N, max_workers)."""
    out = []
    for n in branch_counts:
        w = 1
        while w <= min(n, max_workers):
            out.append({"N": n, "W": w, "predicted_ms": round(model.predict(n, w), 4)})
            w *= 2
    return out


def fit_serial(rows: list[dict], system: str = "vit-1dev") -> dict[int, dict]:
    """The serial ViT on one device, T(L) = a + L * t_block, per batch: for context beside the
    extrapolation (a serial model's latency grows with every block)."""
    out = {}
    for batch in sorted({r["batch"] for r in rows if r["system"] == system}):
        pts = [r for r in rows if r["system"] == system and r["batch"] == batch]
        a, t_block = _line([r["blocks"] for r in pts], [r["p50_ms"] for r in pts])
        out[batch] = {"a_ms": a, "t_block_ms": t_block,
                      "predicted_ms_by_blocks": {str(L): a + L * t_block for L in (16, 32, 64, 128)}}
    return out
