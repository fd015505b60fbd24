"""The training sweep: samples/s and bytes moved per step of every mesh layout R x W = D, of DDP of
the same Para-Former and of one process, by device count D, measured in one run; a cost model fitted
on the points and extrapolated to 64 devices; the reference configuration's bytes; a shaped link.

    python launch/scale.py --preset train          # < 5 min on 2 cores: D = 1, 2, 4
    python launch/scale.py --preset train-tiny     # seconds (what tests/bench/test_train_sweep.py runs)
    python launch/scale.py --preset train --set bench.link=[]      # without the shaped-link runs
    python launch/scale.py --preset train --address auto --set parallel.gpus_per_worker=1   # GPU cluster

With --address the sweep joins that Ray cluster (never a local one; an unreachable address is one
error line, exit 2). With parallel.gpus_per_worker > 0 every rank runs on its own GPU: the layerpar
meshes and DDP on cuda, the group on NCCL; asking for more GPUs than the cluster has is an error
before anything starts (a Ray Train group would otherwise wait for them forever).

Each D is one Ray Train worker group of D ranks that builds every system of that D and times them in
rounds (bench/train_systems.py); every system's weights after its steps are compared with the one
process's. The shaped link runs the 2-rank systems in two network namespaces joined by a veth pair
limited by `tbf` (bench/netns.py; skipped with its reason where that is not possible), on a model
with the reference configuration's 29 MB of gradients (LINK_MODEL).
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from layerpar.bench import train_costmodel, train_report
from layerpar.bench.presets import REFERENCE_BLOCKS, split_sets
from layerpar.bench.train_systems import CALIBRATIONS, ONE, run_rank
from layerpar.config import ConfigError, load_config

# the training benchmark's model (docs/BENCHMARKS.md): 8 branches x depth 1, width 64, 50 tokens
TRAIN_MODEL = ["model.image_size=28", "model.in_channels=1", "model.patch_size=4", "model.dim=64",
               "model.heads=4", "model.mlp_dim=256", "model.num_branches=8", "model.branch_depth=1",
               "train.batch_size=128"]
# across the shaped link: the reference configuration's branches (8 x depth 2, width 192: 7.3 M
# parameters, 29 MB of gradients per DDP step) on 32 x 32 inputs (17 tokens), so a step takes < 1 s
LINK_MODEL = ["train.batch_size=128", *REFERENCE_BLOCKS, "model.num_branches=8", "model.image_size=32",
              "model.patch_size=8"]
TINY_MODEL = ["model.image_size=8", "model.in_channels=1", "model.patch_size=2", "model.dim=16",
              "model.heads=2", "model.mlp_dim=32", "model.num_branches=4", "model.branch_depth=1",
              "train.batch_size=16", "model.dtype=float64"]


@dataclass(frozen=True)
class TrainSettings:
    devices: list[int] = field(default_factory=lambda: [1, 2, 4])
    """Device counts D (ranks); D = 1 is the one process every system is compared with."""
    warmup: int = 3
    """Untimed steps per system first."""
    rounds: int = 4
    """Rounds of timing: each system takes `steps` steps per round, then the next."""
    steps: int = 4
    """Timed steps per system per round."""
    reference: bool = True
    """Also count the bytes per step of layerpar 1x2 and DDP on the reference configuration."""
    link: list[str] = field(default_factory=lambda: ["1gbit", "10gbit"])
    """tbf rates of the shaped-link runs ([] skips them)."""
    link_rounds: int = 2
    """Rounds of timing across the shaped link (LINK_MODEL: ~0.7-0.9 s a step here)."""
    link_steps: int = 3
    """Timed steps per system per round across the shaped link (after one untimed step)."""


PRESETS = {"train": (TRAIN_MODEL, {}),
           "train-tiny": (TINY_MODEL, {"devices": [1, 2], "warmup": 1, "rounds": 2, "steps": 2,
                                       "reference": False, "link": []})}


def build(preset: str, items: list[str], *, address: str | None = None):
    model_sets, bench = PRESETS[preset]
    where = [f"parallel.address={address}"] if address else []
    bench, overrides = split_sets(items, TrainSettings, dict(bench),
                                  ["parallel.threads_per_worker=1", *model_sets, *where])
    settings = TrainSettings(**bench)
    if 1 not in settings.devices or not all(isinstance(d, int) and d >= 1 for d in settings.devices):
        raise ConfigError(f"bench.devices ({settings.devices!r}) must be positive integers including 1 "
                          "(the one process every system is compared with)")
    return load_config(None, overrides), settings


def layouts_for(d: int, num_branches: int) -> list[tuple[int, int]]:
    """Every R x W = d with W a power of two, W <= N, widest first."""
    out, w = [], 1
    while w <= min(d, num_branches):
        if d % w == 0:
            out.append((d // w, w))
        w *= 2
    return sorted(out, key=lambda rw: -rw[1])


def shape_of(cfg) -> train_costmodel.ModelShape:
    import torch

    from layerpar.model import ParaFormer

    m = ParaFormer(cfg.model, seed=0)
    count = lambda mod: sum(p.numel() for p in mod.parameters())  # noqa: E731
    return train_costmodel.ModelShape(
        num_branches=cfg.model.num_branches, dim=cfg.model.dim, batch=cfg.train.batch_size,
        p_branch=count(m.branch(0)), p_embed=count(m.embed), p_head=count(m.head),
        elem_bytes=torch.empty((), dtype=getattr(torch, cfg.model.dtype)).element_size())


def _loop(config: dict) -> None:
    """Per rank of a Ray Train worker group: every system of this D; rank 0 pushes the figures."""
    import ray.train

    from layerpar.config import from_dict
    from layerpar.train.spmd import set_up_rank

    ctx = ray.train.get_context()
    set_up_rank(from_dict(config["spec"]["cfg"]))
    out = run_rank(config["spec"], rank=ctx.get_world_rank(), world=ctx.get_world_size())
    if out is not None:
        ray.get(config["log"].push.remote({"kind": "bench", **out}))
    ray.train.report({"done": 1})


def run_group(cfg, d: int, spec: dict) -> dict:
    """Run `spec` on a Ray Train worker group of d ranks; rank 0's {"ranks", "weights"}."""
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from layerpar.train.raytrain import ProgressLog

    gpus = cfg.parallel.gpus_per_worker  # > 0: one GPU per rank, NCCL (set_up_rank picks the device)
    resources = {"CPU": 1, **({"GPU": gpus} if gpus > 0 else {})}
    log = ProgressLog.remote()
    try:
        with tempfile.TemporaryDirectory() as storage:
            TorchTrainer(_loop, train_loop_config={"spec": spec, "log": log},
                         scaling_config=ScalingConfig(num_workers=d, use_gpu=gpus > 0,
                                                      resources_per_worker=resources),
                         torch_config=TorchConfig(backend="nccl" if gpus > 0 else "gloo",
                                                  timeout_s=int(cfg.parallel.timeout_s)),
                         run_config=RunConfig(name=f"train-sweep-d{d}", storage_path=storage)).fit()
        (event,) = [e for e in ray.get(log.since.remote(0)) if e["kind"] == "bench"]
    finally:
        ray.kill(log)
    return event


def rows_of(event: dict, *, d: int, devices: int, batch: int, shape, backend: str = "gloo") -> list[dict]:
    """One row per system from every rank's figures: the slowest rank's step, the most bytes."""
    ranks, out = event["ranks"], []
    names = [k for k in ranks[0] if k not in ("rank", "ddp-compute")]
    for name in names:
        per = [r[name] for r in ranks]
        slow = max(per, key=lambda p: p["step_ms"])
        one = name == ONE or name in CALIBRATIONS
        row = {"system": "ddp" if name == "ddp" else ("one-process" if one else "layerpar"),
               "D": d, "devices": devices, "oversubscribed": d > devices, "batch": batch,
               "backend": backend,
               "step_ms": slow["step_ms"], "collectives_ms": slow["collectives_ms"],
               "bytes": max(p["bytes"] for p in per)}
        if name == "ddp":  # overlapped with backward: what DDP adds over its no_sync steps
            compute = max(r["ddp-compute"]["step_ms"] for r in ranks)
            row.update(R=d, W=1, compute_ms=compute, collectives_ms=max(0.0, row["step_ms"] - compute))
        else:
            r_, w_ = (1, 1) if one else map(int, name.split("x"))
            row.update(R=r_, W=w_, compute_ms=row["step_ms"] - row["collectives_ms"])
        if name in CALIBRATIONS:  # half the branches (on all rows), or all branches on half the rows
            row.update(layout=name, f_rep=1.0 if name == CALIBRATIONS[0] else 0.5, f_br=0.5,
                       calibration=True)
        row["steps"] = train_costmodel.traffic(row, shape)["steps"]
        rows_per_step = batch // 2 if name == CALIBRATIONS[1] else batch
        row["samples_per_s"] = rows_per_step / row["step_ms"] * 1e3
        out.append(row)
    return out


def _weight_diffs(rows: list[dict], weights: dict, truth: dict, d: int) -> None:
    for row in (r for r in rows if r["D"] == d and not r.get("calibration")):
        name = {"ddp": "ddp", "one-process": ONE}.get(row["system"], f"{row['R']}x{row['W']}")
        got = weights.get(name)
        if got is not None and truth:
            row["max_weight_diff"] = max((got[k] - v).abs().max().item() for k, v in truth.items())


def reference_bytes(d: int = 2, *, gpus_per_worker: float = 0.0) -> dict:
    """Bytes per step, counted on d ranks of the reference configuration (one step each) and by the
    ring rules at 8 ranks: layerpar's widest layout against DDP."""
    cfg = load_config(None, ["parallel.threads_per_worker=1", "train.batch_size=128", *REFERENCE_BLOCKS,
                             "model.num_branches=8", f"parallel.gpus_per_worker={gpus_per_worker}"])
    spec = {"cfg": cfg.to_dict(), "layouts": [[1, d]], "ddp": True, "warmup": 0, "rounds": 1,
            "steps": 1, "batches": 1}
    event = run_group(cfg, d, spec)
    shape = shape_of(cfg)
    top = {k: max(event["ranks"], key=lambda r, k=k: r[k]["bytes"])[k] for k in (f"1x{d}", "ddp")}
    lp, ddp = top[f"1x{d}"]["bytes"], top["ddp"]["bytes"]
    at8 = (train_costmodel.mesh_traffic(1, 8, shape)["bytes"], train_costmodel.ddp_traffic(8, shape)["bytes"])
    return {"config": "8 branches x depth 2, width 192, 197 tokens, batch 128", "params": shape.params,
            "measured_ranks": d, "layerpar_bytes": lp, "ddp_bytes": ddp, "ratio": ddp / lp,
            "ring_rules_8_ranks": {"layerpar_1x8_bytes": at8[0], "ddp_bytes": at8[1],
                                   "ratio": at8[1] / at8[0]},
            # one step each: a magnitude for scaling the cost model, not a benchmark
            "one_step_ms": {k: max(r[k]["step_ms"] for r in event["ranks"])
                            for k in (f"1x{d}", "ddp", "ddp-compute")},
            "shape": dataclasses.asdict(shape)}


def flops(model) -> tuple[float, float]:
    """Multiply-adds per image of (the embedding and head, the branches) of a model config: patch
    projection + head; per block 4 T D^2 (attention projections) + 2 T^2 D (scores) + 2 T D M (MLP)."""
    patches = (model.image_size // model.patch_size) ** 2
    tokens, d = patches + 1, model.dim
    rep = patches * model.in_channels * model.patch_size ** 2 * d + d * model.num_classes
    block = 4 * tokens * d * d + 2 * tokens * tokens * d + 2 * tokens * d * model.mlp_dim
    return float(rep), float(model.num_branches * model.branch_depth * block)


def reference_extrapolation(model: dict, reference: dict) -> dict | None:
    """The 64-device extrapolation for the reference configuration: the fitted a, kappa and
    communication terms, with t_rep + t_br set so that DDP's compute at D = 2 is the reference's
    measured one (one step, no_sync) and split between them as the reference's multiply-adds are."""
    from layerpar.bench.presets import REFERENCE_BLOCKS

    ref_cfg = load_config(None, [*REFERENCE_BLOCKS, "model.num_branches=8"])
    rep, br = flops(ref_cfg.model)
    c = train_costmodel.TrainCostModel.from_dict(model["coefficients"])
    measured = reference["one_step_ms"]["ddp-compute"]
    total = 2 * max(0.0, measured / c.kappa - c.a)  # DDP at D = 2: kappa (a + (t_rep + t_br) / 2)
    scaled = dataclasses.replace(c, t_rep=total * rep / (rep + br), t_br=total * br / (rep + br))
    shape = train_costmodel.ModelShape(**reference["shape"])
    return {**train_costmodel.extrapolate(scaled, shape, error=model.get("pick_error")),
            "t_rep_ms": scaled.t_rep,
            "t_br_ms": scaled.t_br, "calibrated_on_ms": measured}


def shaped_link(settings: TrainSettings) -> dict:
    """layerpar 1x2 and 2x1 against DDP on two ranks across a tbf-shaped veth, per rate (LINK_MODEL)."""
    from layerpar.bench import netns

    reason = netns.available()
    if reason or not settings.link:
        return {"skipped": reason or "bench.link is empty"}
    cfg = load_config(None, ["parallel.threads_per_worker=1", *LINK_MODEL])
    spec = {"cfg": cfg.to_dict(), "layouts": [[1, 2], [2, 1]], "ddp": True, "warmup": 1,
            "rounds": settings.link_rounds, "steps": settings.link_steps, "timeout_s": 300}
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "spec.json"
        path.write_text(json.dumps(spec))
        for rate in settings.link:
            with netns.ShapedLink(rate=rate) as link:
                ranks = link.run_ranks([sys.executable, "-m", "layerpar.bench.train_systems", str(path)],
                                       timeout_s=600)[0]["ranks"]
            step = {k: max(r[k]["step_ms"] for r in ranks) for k in ("1x2", "2x1", "ddp")}
            # counted: the collectives' payload by the ring rules; measured: what each rank's veth
            # end sent per step (tc's tbf byte counter), headers and acknowledgements included
            most = lambda k, what, ranks=ranks: max(r[k][what] or 0 for r in ranks)  # noqa: E731
            out[rate] = {"layerpar_ms": step["1x2"], "layerpar_2x1_ms": step["2x1"], "ddp_ms": step["ddp"],
                         "ratio": step["ddp"] / step["1x2"],
                         "layerpar_bytes": most("1x2", "bytes"),
                         "layerpar_wire_bytes": most("1x2", "wire_bytes"),
                         "layerpar_2x1_bytes": most("2x1", "bytes"),
                         "layerpar_2x1_wire_bytes": most("2x1", "wire_bytes"),
                         "ddp_bytes": most("ddp", "bytes"), "ddp_wire_bytes": most("ddp", "wire_bytes"),
                         "model": "reference branches (8 x depth 2, width 192), 32 x 32 inputs, batch 128"}
            print(f"link {rate}: layerpar 1x2 {step['1x2']:.1f} ms, 2x1 {step['2x1']:.1f} ms, "
                  f"DDP {step['ddp']:.1f} ms", file=sys.stderr, flush=True)
    return out


def check_cluster(cfg, d_max: int) -> dict:
    """The connected Ray cluster: its address and the devices a rank can run on (GPUs when
    parallel.gpus_per_worker > 0, else CPUs); a ConfigError when the largest D cannot be placed,
    which a Ray Train group would otherwise wait for without end."""
    import ray

    res, gpus = ray.cluster_resources(), cfg.parallel.gpus_per_worker
    info = {"gcs_address": ray.get_runtime_context().gcs_address, "resources":
            {k: v for k, v in res.items() if k in ("CPU", "GPU")}}
    if gpus > 0:
        have = res.get("GPU", 0.0)
        if have < gpus * d_max:
            raise ConfigError(
                f"parallel.gpus_per_worker={gpus:g} needs {gpus * d_max:g} GPUs for D = {d_max} ranks but "
                f"the Ray cluster at {info['gcs_address']} has {have:g}; point --address at a cluster "
                "with GPUs, lower bench.devices, or drop parallel.gpus_per_worker to run on CPUs")
        return {**info, "devices": int(have // gpus)}
    if cfg.parallel.address and res.get("CPU", 0.0) < d_max:
        raise ConfigError(f"D = {d_max} ranks need {d_max} CPUs but the Ray cluster at "
                          f"{info['gcs_address']} has {res.get('CPU', 0.0):g}; lower bench.devices")
    # CPU ranks: this machine's cores on a local Ray, the cluster's CPUs when joined
    return {**info, "devices": int(res.get("CPU", 0)) if cfg.parallel.address else os.cpu_count() or 1}


def run(preset: str, sets: list[str], *, out_dir: str, command: str, address: str | None = None) -> dict:
    import ray

    from layerpar.parallel.cluster import connect

    cfg, s = build(preset, sets, address=address)
    shape, started = shape_of(cfg), time.time()
    owns = connect(cfg, min_cpus=max(s.devices) + 1)  # --address: join it (an error if unreachable)
    rows, truth, reference = [], {}, None
    try:
        where = check_cluster(cfg, max(s.devices))
        cores = where["devices"]
        backend = "nccl" if cfg.parallel.gpus_per_worker > 0 else "gloo"
        for d in sorted(s.devices):
            lays = layouts_for(d, cfg.model.num_branches)
            spec = {"cfg": cfg.to_dict(), "layouts": [list(x) for x in lays], "ddp": d > 1,
                    "warmup": s.warmup, "rounds": s.rounds, "steps": s.steps, "weights": True}
            event = run_group(cfg, d, spec)
            truth = event["weights"][ONE] if d == 1 else truth
            rows += rows_of(event, d=d, devices=cores, batch=cfg.train.batch_size, shape=shape,
                            backend=backend)
            _weight_diffs(rows, event["weights"], truth, d)
            for r in (r for r in rows if r["D"] == d):
                name = r.get("layout") or train_costmodel.layout_name(r)
                print(f"D={d} {name:16s} {r['samples_per_s']:9.1f} samples/s "
                      f"step {r['step_ms']:7.2f} ms  coll {r['collectives_ms']:6.2f} ms  "
                      f"{r['bytes']:12,.0f} B/step  diff {r.get('max_weight_diff', 0):.1e}",
                      file=sys.stderr, flush=True)
        if s.reference:
            reference = reference_bytes(gpus_per_worker=cfg.parallel.gpus_per_worker)
    finally:
        if owns:
            ray.shutdown()
    link = shaped_link(s)
    model = train_costmodel.fit_and_judge(rows, shape) if len(rows) >= 3 else None
    if model and reference:
        model["extrapolation_reference"] = reference_extrapolation(model, reference)
    run_dir = Path(out_dir) / f"scale-{preset}-{time.strftime('%Y%m%d-%H%M%S')}"
    meta = {"command": command, "machine": _machine(), "duration_s": round(time.time() - started, 1),
            "preset": preset, "settings": dataclasses.asdict(s), "config": cfg.to_dict(),
            "address": address, "cluster": where, "link": link, "reference": reference,
            "notes": _notes(rows, model, cores, backend)}
    summary = train_report.write(rows, shape=shape, model_summary=model, out_dir=run_dir, meta=meta)
    ref_ex = (model or {}).get("extrapolation_reference") or {}
    return {"run_dir": str(run_dir), **summary, "picks_reference": ref_ex.get("picks"),
            "reference": {k: v for k, v in (reference or {}).items() if k != "shape"} or None,
            "link": link}


def _notes(rows: list[dict], model: dict | None, cores: int, backend: str = "gloo") -> list[str]:
    """What a reader of the report must keep in mind, from this run's own figures."""
    over = sorted({r["D"] for r in rows if r["D"] > cores})
    notes = ["Layouts of one D are timed in rounds side by side; compare them within a run (this "
             "machine's speed drifts between runs).",
             "Bytes per step in the per-D tables are counted (the collectives' payload by the ring "
             "rules), not measured; the slow-link section has both."]
    if over:
        notes.append(f"D = {', '.join(map(str, over))} on {cores} cores time-share them "
                     "(oversubscribed): those points test the cost model's s, not scaling.")
    if model:
        c = model["coefficients"]
        where = "this machine's loopback gloo" if backend == "gloo" else f"this cluster's {backend}"
        notes.append(f"alpha ({c['alpha_ms']:.2g} ms per hop) and beta ({c['beta_gbit_s'] or 0:.2g} Gbit/s) "
                     f"are {where}, waiting for a peer included; the 64-device "
                     "extrapolation keeps alpha, so every hop of a collective is priced at it.")
        err = model.get("pick_error")
        if err is not None:
            notes.append(f"The model's largest error on this run (fit, leave-one-out or held out) is "
                         f"{err:.0%}: a 64-device pick whose runner-up is predicted within it is "
                         "marked too close to call.")
    return notes


def _machine() -> str:
    import platform

    import ray
    import torch

    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")),
               platform.processor()) if os.path.exists("/proc/cpuinfo") else platform.processor()
    return f"{os.cpu_count()} CPUs ({cpu}), torch {torch.__version__}, ray {ray.__version__}"
