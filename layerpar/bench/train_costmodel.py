"""The cost model of one training step on an R x W mesh (R replicas x W branch ranks, D = R * W):

    T_ms = k * s * (a + t_rep * f_rep + t_br * f_br) + alpha * s * steps + bytes / beta

f_rep = 1/R (the replicated embedding and head on the replica's B/R rows); f_br = (K_max/N) / R (the
rank's ceil(N/W) branches on its rows); s = max(1, D / devices) (ranks time-sharing cores); steps
and bytes: latency steps and bytes a rank sends per step; a: fixed per-step cost; alpha: ms per
latency step; beta: bytes per ms; k = kappa for a multi-rank point (ranks sharing a host slow each
other), 1 for one process. DDP of D ranks is R = D, W = 1 for compute; one process R = W = 1.

A layerpar step (per rank): (1) all_gather of the pooled branch rows (K_max * ceil(B/R) * d) over
the branch group, if W > 1; (2) a sum over the replica group of owned-branch + head + embedding
gradients + the loss, if R > 1; (3) a sum over the branch group of the embedding gradients + a
squared norm, if W > 1. On gloo a sum gathers and adds when elements * n <= GATHER_SUM_MAX, else
all-reduces (NCCL: always), as comm._sum_over_ranks. Ring: all_gather of S bytes over n sends
(n-1) S, all_reduce 2 (n-1)/n S; latency steps of a tree: ceil(log2 n), 2 ceil(log2 n).

Fitted by non-negative least squares on relative residuals (rows weighted by 1 / measured ms) on
the corner points, judged on every other point (fit_and_judge), in two stages (fit): on 2 devices
every D >= 2 point has s * f_br = 1/2 (time-sharing undoes the split), so the compute terms come
from one process and its calibration points (half the branches, half the rows), and kappa, alpha,
beta from the multi-rank points (kappa on their measured compute, alpha and beta on their measured
collective time).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import asdict, dataclass

import numpy as np

from layerpar.parallel.comm import GATHER_SUM_MAX  # elements * ranks below which gloo gathers


@dataclass(frozen=True)
class ModelShape:
    num_branches: int
    dim: int
    batch: int
    p_branch: int
    p_embed: int
    p_head: int
    elem_bytes: int = 4

    @property
    def params(self) -> int:
        return self.num_branches * self.p_branch + self.p_head + self.p_embed


def _ring(op: str, nbytes: float, n: int) -> tuple[float, int]:
    """(bytes a rank sends, latency steps) of an all_gather / all_reduce of nbytes over n: the bytes
    of a ring, the latency of a tree (ceil(log2 n) hops each way), as libraries pick for small and
    large messages; a ring's n - 1 hops would make 64 ranks pay 126 hops of this machine's latency."""
    hops = math.ceil(math.log2(n)) if n > 1 else 0
    return ((n - 1) * nbytes, hops) if op == "all_gather" else (2 * (n - 1) / n * nbytes, 2 * hops)


def _sum(elements: int, n: int, elem_bytes: int, backend: str) -> tuple[float, int]:
    """comm._sum_over_ranks: gloo gathers and adds a small buffer, else (and NCCL) all-reduces."""
    small = backend == "gloo" and elements * n <= GATHER_SUM_MAX
    return _ring("all_gather" if small else "all_reduce", elements * elem_bytes, n)


def owned_counts(num_branches: int, workers: int) -> list[int]:
    """Branches each branch rank owns (layout.Layout: the first N % W ranks own one more)."""
    base, extra = divmod(num_branches, workers)
    return [base + (w < extra) for w in range(workers)]


def mesh_traffic(R: int, W: int, shape: ModelShape, *, backend: str = "gloo") -> dict:
    """Per-rank wire traffic of one layerpar training step. bytes and steps are each the max over
    ranks (ranks with fewer branches may gather where others all-reduce); by_verb is the bytes of
    the rank that sends most (its verbs sum to bytes)."""
    e, n_br = shape.elem_bytes, shape.num_branches
    if W > n_br:
        raise ValueError(f"W ({W}) must be <= num_branches ({n_br}): every rank owns a branch")
    k_max, b_r = math.ceil(n_br / W), math.ceil(shape.batch / R)
    rows = _ring("all_gather", k_max * b_r * shape.dim * e, W) if W > 1 else (0.0, 0)
    branch = _sum(shape.p_embed + 1, W, e, backend) if W > 1 else (0.0, 0)
    best, steps = None, 0
    for k in sorted(set(owned_counts(n_br, W))):
        rep = _sum(k * shape.p_branch + shape.p_head + shape.p_embed + 1, R, e, backend) \
            if R > 1 else (0.0, 0)
        steps = max(steps, rows[1] + rep[1] + branch[1])
        best = rep if best is None or rep[0] > best[0] else best
    by_verb = {"rows": float(rows[0]), "replica_sum": float(best[0]), "branch_sum": float(branch[0])}
    return {"bytes": sum(by_verb.values()), "steps": steps,
            "collectives": 2 * (W > 1) + (R > 1), "by_verb": by_verb}


def ddp_traffic(D: int, shape: ModelShape, *, buckets: int = 1) -> dict:
    """DDP over D ranks: an all_reduce of every gradient (params * elem_bytes) in `buckets` parts."""
    if D <= 1:
        return {"bytes": 0.0, "steps": 0, "collectives": 0, "by_verb": {"all_reduce": 0.0}}
    nbytes, steps = _ring("all_reduce", shape.params * shape.elem_bytes, D)
    return {"bytes": nbytes, "steps": steps * buckets, "collectives": buckets,
            "by_verb": {"all_reduce": nbytes}}


def _layout(row: dict) -> tuple[int, int, int]:
    """(R, W, D) for compute: DDP of D ranks is D x 1, one process 1 x 1."""
    if row["system"] == "one-process":
        return 1, 1, 1
    if row["system"] == "ddp":
        return int(row["D"]), 1, int(row["D"])
    r, w = int(row["R"]), int(row["W"])
    return r, w, int(row.get("D") or r * w)


def traffic(row: dict, shape: ModelShape) -> dict:
    """The ring-rule traffic of a row's layout (its "backend", default gloo; DDP its "buckets")."""
    r, w, d = _layout(row)
    if row["system"] == "ddp":
        return ddp_traffic(d, shape, buckets=row.get("buckets", 1))
    return mesh_traffic(r, w, shape, backend=row.get("backend", "gloo"))


def features(row: dict, shape: ModelShape) -> np.ndarray:
    """[s, s f_rep, s f_br, s steps, bytes]: what a, t_rep, t_br, alpha and 1/beta multiply. Ranks
    that time-share cores stretch all their work, the fixed part too, and wait at every hop for a
    peer to be scheduled."""
    r, w, d = _layout(row)
    s = max(1.0, d / max(1, row.get("devices") or d))
    k_max = math.ceil(shape.num_branches / w)
    if row.get("bytes") is None or row.get("steps") is None:  # not measured: the ring rules
        row = {**row, **traffic(row, shape)}
    nbytes, steps = float(row["bytes"]), float(row["steps"])
    f_rep = row.get("f_rep", 1.0 / r)  # a calibration point says its own shares (train_sweep)
    f_br = row.get("f_br", k_max / shape.num_branches / r)
    return np.array([s, s * f_rep, s * f_br, s * steps, nbytes])


@dataclass(frozen=True)
class TrainCostModel:
    """Coefficients in ms (inv_beta: ms per byte; 0 when no traffic was fitted); kappa multiplies the
    compute of a multi-rank point (ranks that share a host slow each other: memory, caches, the
    runtime's own threads), 1 for one process."""

    a: float
    t_rep: float
    t_br: float
    alpha: float
    inv_beta: float
    kappa: float = 1.0

    def phases(self, row_like: dict, shape: ModelShape) -> dict[str, float]:
        x = features(row_like, shape)
        k = 1.0 if _layout(row_like)[2] == 1 else self.kappa
        return {"compute_ms": float(k * (self.a * x[0] + self.t_rep * x[1] + self.t_br * x[2])),
                "latency_ms": float(self.alpha * x[3]), "bandwidth_ms": float(self.inv_beta * x[4])}

    def predict(self, row_like: dict, shape: ModelShape) -> float:
        return sum(self.phases(row_like, shape).values())

    def at_rate(self, gbit_s: float) -> TrainCostModel:
        """The same model with beta set to a link of gbit_s Gbit/s (alpha kept)."""
        return dataclasses.replace(self, inv_beta=1.0 / (gbit_s * 1.25e5))


    @classmethod
    def from_dict(cls, d: dict) -> TrainCostModel:
        """Back from to_dict (or fit_and_judge's "coefficients")."""
        return cls(d["a_ms"], d["t_rep_ms"], d["t_br_ms"], d["alpha_ms"], d["inv_beta_ms_per_byte"],
                   d.get("kappa", 1.0))

    def to_dict(self) -> dict:
        beta = 1.0 / self.inv_beta if self.inv_beta > 0 else None
        return {**{f"{k}_ms": v for k, v in asdict(self).items() if k not in ("inv_beta", "kappa")},
                "kappa": self.kappa,
                "inv_beta_ms_per_byte": self.inv_beta, "beta_bytes_per_ms": beta,
                "beta_gbit_s": beta * 8e-6 if beta else None}


def nnls(A: np.ndarray, b: np.ndarray, max_iter: int = 200) -> np.ndarray:
    """min |A x - b| subject to x >= 0 (Lawson-Hanson active set; columns scaled to unit norm)."""
    norms = np.linalg.norm(A, axis=0)
    scale = np.where(norms > 0, norms, 1.0)
    A = A / scale
    n = A.shape[1]
    x, passive = np.zeros(n), np.zeros(n, dtype=bool)
    tol = 10 * np.finfo(float).eps * max(A.shape) * max(1.0, np.abs(A).sum(axis=0).max())
    for _ in range(max_iter):
        grad = A.T @ (b - A @ x)
        if passive.all() or grad[~passive].max() <= tol:
            break
        passive[np.argmax(np.where(passive, -np.inf, grad))] = True
        for _ in range(n + 1):
            z = np.zeros(n)
            z[passive] = np.linalg.lstsq(A[:, passive], b, rcond=None)[0]
            if (z[passive] > tol).all():
                x = z
                break
            neg = passive & (z <= tol)
            gap = x[neg] - z[neg]
            step = np.min(np.where(gap > 0, x[neg] / np.where(gap > 0, gap, 1.0), 0.0))
            x = x + step * (z - x)
            passive &= x > tol
            x[~passive] = 0.0
    return x / scale


def _nnls_rel(A: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Non-negative least squares on relative residuals (each row weighted by 1 / measured)."""
    return nnls(A / y[:, None], np.ones(len(y)))


def fit(rows: list[dict], shape: ModelShape) -> TrainCostModel:
    """Two stages, all coefficients >= 0. (1) The compute terms a, t_rep, t_br from the one-process
    points alone -- one process, and its calibration points with half the branches and half the
    rows (train_sweep): on a host with few cores every multi-rank point time-shares so that
    s * f_br is the same, and only one process can tell a fixed cost from branch compute. (2) kappa,
    alpha and 1/beta from the multi-rank points, given (1). Without one-process points, all five
    at once (kappa 1)."""
    pts = [r for r in rows if r.get("step_ms")]
    if not pts:
        raise ValueError("the training cost model needs at least one measured point")
    one = [r for r in pts if _layout(r)[2] == 1]
    multi = [r for r in pts if _layout(r)[2] > 1]
    y = lambda rs: np.array([r["step_ms"] for r in rs], dtype=float)  # noqa: E731
    if not one:
        return TrainCostModel(*(float(c) for c in _nnls_rel(np.stack([features(r, shape) for r in pts]),
                                                            y(pts))))
    a, t_rep, t_br = (float(c) for c in _nnls_rel(np.stack([features(r, shape)[:3] for r in one]), y(one)))
    if not multi:
        return TrainCostModel(a, t_rep, t_br, 0.0, 0.0)
    compute = np.array([float(np.dot([a, t_rep, t_br], features(r, shape)[:3])) for r in multi])
    comm = np.array([features(r, shape)[3:] for r in multi])
    if all(r.get("compute_ms") is not None and r.get("collectives_ms") is not None for r in multi):
        # each term on what it models: kappa on the measured compute, alpha and beta on the
        # measured collective time (waiting for a peer included)
        kappa = float(_nnls_rel(compute[:, None], np.array([max(r["compute_ms"], 1e-3) for r in multi]))[0])
        alpha, inv_beta = (float(c) for c in _nnls_rel(
            comm, np.array([max(r["collectives_ms"], 1e-3) for r in multi])))
    else:
        kappa, alpha, inv_beta = (float(c) for c in _nnls_rel(np.column_stack([compute, comm]), y(multi)))
    return TrainCostModel(a, t_rep, t_br, alpha, inv_beta, kappa)


def layout_name(row: dict) -> str:
    if row["system"] in ("one-process", "ddp"):
        return row["system"]
    return f"{row['R']}x{row['W']}"


def fit_points(rows: list[dict]) -> list[int]:
    """Indices of the corners: one process; per D, the layerpar layouts with the largest W and the
    largest R; DDP at the smallest D > 1."""
    idx = {i for i, r in enumerate(rows) if r["system"] == "one-process"}  # with its calibrations
    lp = [(i, _layout(r)) for i, r in enumerate(rows) if r["system"] == "layerpar"]
    for d in {lay[2] for _, lay in lp}:
        at = [(i, lay) for i, lay in lp if lay[2] == d]
        for axis in (0, 1):  # the largest R, the largest W
            top = max(lay[axis] for _, lay in at)
            idx |= {i for i, lay in at if lay[axis] == top}
    ddp = [(int(r["D"]), i) for i, r in enumerate(rows) if r["system"] == "ddp" and r["D"] > 1]
    idx |= {i for d, i in ddp if d == min(ddp)[0]}
    return sorted(idx)


def shares_features(row: dict, others: list[dict], shape: ModelShape, rtol: float = 1e-3) -> dict | None:
    """The first of `others` whose features equal row's (to rtol), e.g. DDP at D = 4 and layerpar 4x1:
    the same compute shares, latency steps and bytes (every gradient summed over 4 replicas)."""
    x = features(row, shape)
    return next((o for o in others if np.allclose(features(o, shape), x, rtol=rtol, atol=0)), None)


def fit_and_judge(rows: list[dict], shape: ModelShape, **extrapolate_kw) -> dict:
    """Fit on the corners, judge on the rest; sets fit / predicted_ms / pred_error on each row. A point
    whose features equal a fit point's is predicted as that fit point is: it is labelled
    `same_features_as` and left out of the held-out set (it tests nothing the fit did not see)."""
    everything, rows = rows, [r for r in rows if r.get("step_ms")]
    train = fit_points(rows)
    model = fit([rows[i] for i in train], shape)
    for r in everything:  # a row without a measurement gets a prediction, no error
        r.update(fit=False, predicted_ms=model.predict(r, shape), pred_error=None)
    for i, r in enumerate(rows):
        r["fit"] = i in train
        r["pred_error"] = (r["predicted_ms"] - r["step_ms"]) / r["step_ms"]
    pt = lambda r: {"system": r["system"], "layout": layout_name(r), "D": _layout(r)[2]}  # noqa: E731
    name = lambda p: f"{p['layout']}@D{p['D']}"  # noqa: E731
    fitted = [rows[i] for i in train]
    held, same = [], []
    for r in (r for r in rows if not r["fit"]):
        twin = shares_features(r, fitted, shape)
        if twin is not None:
            r["same_features_as"] = name(pt(twin))
            same.append({**pt(r), "same_features_as": r["same_features_as"]})
        else:
            held.append(r)
    # each multi-rank point from a model fitted on all the others (the one-process points fix the
    # compute terms exactly: without one of them they are not determined)
    multi = [i for i, r in enumerate(rows) if _layout(r)[2] > 1]
    loo = max(abs(fit(rows[:i] + rows[i + 1:], shape).predict(rows[i], shape) / rows[i]["step_ms"] - 1)
              for i in multi) if len(multi) >= 2 else None
    errors = {"fit": max((abs(r["pred_error"]) for r in rows if r["fit"]), default=None),
              "held_out": max((abs(r["pred_error"]) for r in held), default=None), "loo": loo}
    # the error a 64-device pick is judged against: the largest the model showed on this run
    error = max((e for e in errors.values() if e is not None), default=None)
    return {"coefficients": model.to_dict(), "fit_points": [pt(rows[i]) for i in train],
            "held_out_points": [pt(r) for r in held], "same_features_points": same,
            "max_abs_error_held_out": errors["held_out"],
            "held_out_note": None if held else "every point was a fit point or shares a fit point's "
                                                "features: no held-out error",
            "max_abs_error_fit": errors["fit"], "loo_max_abs_error": loo, "pick_error": error,
            "extrapolation": extrapolate(model, shape, error=error, **extrapolate_kw)}


def extrapolate(model: TrainCostModel, shape: ModelShape, *, devices: int = 64,
                rates_gbit=(10, 100), backend: str = "nccl", ddp_buckets: int = 1,
                error: float | None = None) -> dict:
    """Predicted steps on `devices` devices (one per rank: s = 1), beta set to each link rate and
    alpha kept: every layout R x W = devices (W a power of two dividing devices, W <= N) and DDP.
    Returns {"rows": [...], "picks": {rate: layout with the smallest predicted step}, "close":
    {rate: a sentence, where the runner-up is predicted within the model's `error` of the pick}}."""
    layouts, w = [], 1
    while w <= min(devices, shape.num_branches):
        if devices % w == 0:
            layouts.append({"system": "layerpar", "R": devices // w, "W": w})
        w *= 2
    layouts.append({"system": "ddp", "R": devices, "W": 1})
    out, picks, close = [], {}, {}
    for rate in rates_gbit:
        m = model.at_rate(rate)
        group = []
        for lay in layouts:
            row = {**lay, "D": devices, "devices": devices, "backend": backend, "buckets": ddp_buckets}
            row.update((k, traffic(row, shape)[k]) for k in ("bytes", "steps"))
            ph = m.phases(row, shape)
            step = sum(ph.values())
            group.append({"rate_gbit": rate, "layout": layout_name(row), **row, **ph,
                          "predicted_ms": step, "samples_per_s": shape.batch / step * 1e3,
                          "picked": False})
        ranked = sorted(group, key=lambda g: g["predicted_ms"])
        best = ranked[0]
        best["picked"] = True
        picks[f"{rate:g}"] = best["layout"]
        # the runner-up is the best layout the model tells apart (DDP and layerpar devices x 1 have
        # the same features: one computation under two names)
        second = next((g for g in ranked[1:] if not np.allclose(features(g, shape), features(best, shape),
                                                                rtol=1e-3, atol=0)), None)
        gap = second["predicted_ms"] / best["predicted_ms"] - 1 if second else None
        if error is not None and gap is not None and gap <= error:
            close[f"{rate:g}"] = (f"too close to call within the model's {error:.0%} error: "
                                  f"{best['layout']} {best['predicted_ms']:.1f} ms vs {second['layout']} "
                                  f"{second['predicted_ms']:.1f} ms ({gap:.0%} apart)")
        out += group
    return {"devices": devices, "backend": backend, "rows": out, "picks": picks, "close": close,
            "error": error}
