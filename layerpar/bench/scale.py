"""The scaling sweep: workers W x branches N x batch, every system measured side by side in one run.

    python launch/scale.py                                  # default preset (< 5 min on 2 cores)
    python launch/scale.py --preset tiny                    # seconds; what the test runs
    python launch/scale.py --preset gpu-one                 # one GPU, N = 1..32 fused (no Ray)
    python launch/scale.py --preset lm                      # LM decoding (bench/lm_scale.py)
    python launch/scale.py --set bench.workers=[1,2] --set bench.batches=[1]
    python launch/scale.py --address auto --set parallel.gpus_per_worker=1 \
        --set bench.workers=[1,2,4,8] --set bench.branches=[8,16,32]   # a GPU cluster

`--set bench.<field>=value` changes the sweep (fields of BenchSettings); any other `--set` is a
config override (`model.dim=256`). The last stdout line is one JSON object: run_dir and headlines.
On a cluster (`--address`) the layerpar workers run on the cluster's devices while reference-threads,
vit-1dev and vit-pipeline run on the driver's CPU; several Ray nodes on one machine are reported as
a simulated cluster.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import torch

from layerpar.bench import report
from layerpar.bench.harness import measure, measure_interleaved, summarize
from layerpar.bench.lm_scale import LM_PRESETS
from layerpar.bench.presets import (
    GPU_SYSTEMS,
    PRESETS,
    BenchSettings,
    build_settings,
)
from layerpar.bench.systems import (
    CudaGraphSystem,
    LayerparSystem,
    ModelSystem,
    ReferenceThreads,
    micro_batches_for,
    param_count,
    reference_model,
)
from layerpar.bench.train_sweep import PRESETS as TRAIN_PRESETS
from layerpar.config import Config, ConfigError
from layerpar.model import ParaFormer, ViT
from layerpar.model.layers import seeded


class Sweep:
    """Runs every point of a preset; rows collect in self.rows (the depth pair's in self.pairs)."""

    def __init__(self, cfg: Config, settings: BenchSettings):
        self.cfg, self.s, self.seed = cfg, settings, cfg.train.seed
        self.gpu = any(name in GPU_SYSTEMS for name in settings.systems)
        self.devices = settings.devices or (1 if self.gpu else os.cpu_count() or 1)
        self.rows: list[dict] = []
        self.skipped: list[dict] = []
        self.inputs = {b: torch.randn(b, cfg.model.in_channels, cfg.model.image_size,
                                      cfg.model.image_size, generator=seeded(1234, b))
                       for b in settings.batches}
        self._truth: dict[tuple[str, int, int], torch.Tensor] = {}
        self.pairs: list[dict] = []  # the depth pair, measured apart from the sweep (run_depth_pair)

    def model_cfg(self, n: int):
        return dataclasses.replace(self.cfg.model, num_branches=n)

    def cfg_for(self, n: int) -> Config:
        return self.cfg.replace(model={"num_branches": n})

    def vit(self, n: int) -> ModelSystem:
        return ModelSystem("vit-1dev", ViT(self.model_cfg(n), seed=self.seed), torch.device("cpu"))

    def truth(self, kind: str, n: int, batch: int) -> torch.Tensor:
        """Logits of the single-process CPU model (`paraformer` or `vit`) on the first rows."""
        key = (kind, n, batch)
        if key not in self._truth:
            cls = ParaFormer if kind == "paraformer" else ViT
            model = cls(self.model_cfg(n), seed=self.seed).eval()
            with torch.no_grad():  # float32 on the CPU, whatever the system under test uses
                self._truth[key] = model(self.inputs[batch][: self.s.check_rows].float().cpu())
        return self._truth[key]

    def _timing_args(self) -> dict:
        s = self.s
        return {"warmup": s.warmup, "reps": s.reps, "min_reps": s.min_reps, "max_seconds": s.max_seconds}

    def record(self, system, n: int, w: int, params: int, *, eager: bool = True,
               graphs: bool = False) -> None:
        """Measure `system` at every batch size (graphs: also, or only, its CUDA-graph replay)."""
        for batch in self.s.batches:
            # on a GPU the batch is resident before timing: the latency is the model's, not the copy's
            x = self.inputs[batch].to("cuda") if system.cuda else self.inputs[batch]
            variants = ([system] if eager else []) + ([CudaGraphSystem(system, x)] if graphs else [])
            for v in variants:
                timing, logits = measure(lambda v=v, x=x: v.run(x), cuda=v.cuda, phases=v.phases,
                                         **self._timing_args())
                self._add(v.name, n, w, batch, params, timing, logits, v.bytes_moved())
            del variants

    def record_interleaved(self, members: dict[str, tuple[object, int, int]], params: dict[int, int],
                           *, pair: bool = False) -> None:
        """Measure systems (key -> (system, N, W)) in round-robin, batch size by batch size; params:
        N -> parameter count; pair: they are the depth pair (rows into self.pairs)."""
        systems = {key: m for key, (m, _, _) in members.items()}
        for batch in self.s.batches:
            x = self.inputs[batch]
            results = measure_interleaved({k: (lambda m=m, x=x: m.run(x)) for k, m in systems.items()},
                                          phases={k: m.phases for k, m in systems.items()},
                                          **self._timing_args())
            for key, (system, n, w) in members.items():
                timing, logits = results[key]
                self._add(system.name, n, w, batch, params[n], timing, logits,
                          None if pair else system.bytes_moved(), pair=pair)

    def _add(self, name, n, w, batch, params, timing, logits, bytes_moved=None, *, pair=False) -> None:
        truth = self.truth(reference_model(name), n, batch)
        diff = (logits[: truth.shape[0]].float().cpu() - truth).abs().max().item()
        row = {"system": name, "N": n, "W": w, "batch": batch,
               "blocks": n * self.cfg.model.branch_depth, "params": params,
               "oversubscribed": w > self.devices, **timing.to_dict(),
               "throughput_sps": batch / (timing.p50_ms / 1e3),
               "bytes": dict(bytes_moved or {}), "max_abs_diff": diff}
        (self.pairs if pair else self.rows).append(row)
        flag = " OVERSUBSCRIBED" if row["oversubscribed"] else ""
        print(f"{'depth pair ' if pair else ''}{name:22s} N={n:<3d} W={w:<2d} B={batch:<3d} "
              f"p50 {row['p50_ms']:9.3f} ms  p95 {row['p95_ms']:9.3f}  reps {row['reps']:<3d} "
              f"diff {row['max_abs_diff']:.1e}{flag}", file=sys.stderr, flush=True)

    def run_gpu(self) -> None:
        device = torch.device("cuda")
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = self.s.tf32
        dtype = getattr(torch, self.s.dtype)
        self.inputs = {b: x.to(dtype) for b, x in self.inputs.items()}
        self.warm_gpu(device, dtype)
        for n in self.s.branches:
            for name, cls in (("paraformer-1gpu", ParaFormer), ("vit-1gpu", ViT)):
                eager, graphs = name in self.s.systems, name + "-graph" in self.s.systems
                if eager or graphs:
                    system = ModelSystem(name, cls(self.model_cfg(n), seed=self.seed).to(dtype), device)
                    self.record(system, n, 1, param_count(system.model), eager=eager, graphs=graphs)
            torch.cuda.empty_cache()

    def warm_gpu(self, device: torch.device, dtype: torch.dtype, seconds: float = 1.0) -> None:
        """Run throw-away forwards first, so the first measured point does not pay for the GPU's
        clocks ramping up and the libraries' lazy initialisation."""
        models = [cls(self.model_cfg(1), seed=0).to(device, dtype).eval() for cls in (ParaFormer, ViT)]
        x = self.inputs[max(self.s.batches)].to(device)
        end = time.perf_counter() + seconds
        with torch.no_grad():
            while time.perf_counter() < end:
                for m in models:
                    m(x)
                torch.cuda.synchronize()

    def run_cpu(self) -> None:
        """Every N with all its worker counts W <= devices in one round-robin (this machine's
        speed drifts over minutes: S(W) and the cost model's fit compare points measured side by
        side), then the oversubscribed W on their own."""
        from layerpar.bench.pipeline import PipelinePool

        s = self.s
        within = [w for w in s.workers if w <= self.devices]
        # (the pipelines' worker counts, their points (N, W group)), in the order they run
        plan = [(within, [(n, ws) for n in s.branches
                          for ws in self._fitting([w for w in within if w <= n])])]
        for w in (w for w in s.workers if w > self.devices):
            # time-shared workers say little; every one of them costs an actor start-up
            branch_counts = [n for n in s.branches if n >= w]
            if s.oversubscribed != "all":
                branch_counts = branch_counts[-1:] if s.oversubscribed == "largest" else []
            if branch_counts:
                plan.append(([w], [(n, [w]) for n in branch_counts]))
        for pool_ws, points in plan:
            pools = {w: PipelinePool(w) for w in pool_ws if w > 1} if "vit-pipeline" in s.systems else {}
            try:
                for n, ws in points:
                    self._cpu_point(n, ws, pools)
            finally:
                for pool in pools.values():
                    pool.close()
        self.rows.sort(key=lambda r: (r["W"], r["N"], r["batch"]))  # stable: systems keep their order

    def _engines_per_point(self) -> int:
        return sum(f"layerpar-{t}" in self.s.systems for t in ("collective", "object_store"))

    def _capacity(self) -> int:
        """Workers the connected cluster can hold at once (CPUs, or GPUs for GPU workers)."""
        import ray

        p, res = self.cfg.parallel, ray.cluster_resources()
        if p.gpus_per_worker > 0:
            return int(res.get("GPU", 0) / p.gpus_per_worker)
        return int(res.get("CPU", 0) / max(p.cpus_per_worker, 1e-9))

    def _fitting(self, ws: list[int]) -> list[list[int]]:
        """ws split into groups whose engines fit the cluster together (one group when they do)."""
        cap, per = self._capacity(), max(1, self._engines_per_point())
        groups: list[list[int]] = []
        for w in ws:
            if groups and (sum(groups[-1]) + w) * per <= cap:
                groups[-1].append(w)
            else:
                groups.append([w])
        return groups

    def run_depth_pair(self) -> None:
        """The depth headline in one round-robin: N = 1 on W = 1 beside N = 2 on W = 2 (each
        transport) and the serial ViT 1 and 2 blocks deep, at every batch size: the sweep measures
        N = 1 and N = 2 minutes apart, and this machine's speed drifts by 20-30% over minutes."""
        s = self.s
        if not ({1, 2} <= set(s.branches) and {1, 2} <= set(s.workers) and self.devices >= 2
                and 3 * self._engines_per_point() <= self._capacity()):
            return  # the report then takes the depth ratios from the sweep's points, and says so
        members: dict[str, tuple[object, int, int]] = {}  # key -> (system, N, W), ordered by N below
        try:
            for t in ("collective", "object_store"):
                if f"layerpar-{t}" in s.systems:
                    for n in (1, 2):
                        members[f"{t}-{n}"] = (LayerparSystem(self.cfg_for(n), workers=n, transport=t), n, n)
            if "vit-1dev" in s.systems:
                for n in (1, 2):
                    members[f"vit-{n}"] = (self.vit(n), n, 1)
            # the serial ViT has as many parameters as the Para-Former of its blocks
            params = {n: param_count(ParaFormer(self.model_cfg(n))) for n in (1, 2)}
            self.record_interleaved(members, params, pair=True)
        finally:
            for system, *_ in members.values():
                system.close()

    def skip(self, system: str, n: int, w: int, exc: BaseException) -> None:
        """A point that could not be measured is reported, not fatal."""
        reason = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        self.skipped.append({"system": system, "N": n, "W": w, "reason": reason})
        print(f"{system:22s} N={n:<3d} W={w:<2d} SKIPPED: {reason}", file=sys.stderr, flush=True)

    def _cpu_point(self, n: int, ws: list[int], pools: dict) -> None:
        """N branches with each W in ws: layerpar (both transports), reference-threads and the serial
        ViT measured in one round-robin, then the pipeline (its own processes) per W."""
        systems = self.s.systems
        local = ParaFormer(self.model_cfg(n), seed=self.seed).eval()
        params = param_count(local)
        engines = [(t, w) for w in ws for t in ("collective", "object_store")
                   if f"layerpar-{t}" in systems]
        # the engines start together (actor start-up is most of a point's set-up time); idle
        # engines use no CPU while another system is timed
        with ThreadPoolExecutor(max_workers=max(1, len(engines))) as ex:
            futures = [ex.submit(LayerparSystem, self.cfg_for(n), workers=w, transport=t)
                       for t, w in engines]
        group: list[tuple[object, int]] = []  # (system, its W label)
        for (t, w), f in zip(engines, futures, strict=True):
            try:
                group.append((f.result(), w))
            except Exception as exc:  # noqa: BLE001 - e.g. the cluster cannot place W workers
                self.skip(f"layerpar-{t}", n, w, exc)
        try:
            if "reference-threads" in systems:
                group += [(ReferenceThreads(local, workers=w), w) for w in ws]
            if "vit-1dev" in systems and min(self.s.workers) in ws:
                group.append((self.vit(n), 1))
            self.record_interleaved({f"{m.name}@{w}": (m, n, w) for m, w in group}, {n: params})
        finally:
            for system, _ in group:
                system.close()
        for w in ws:
            if pools.get(w) is not None and n * self.cfg.model.branch_depth >= w:
                self._pipeline_point(pools[w], n, w, params)

    def _pipeline_point(self, pool, n: int, w: int, params: int) -> None:
        model = dataclasses.asdict(self.model_cfg(n))
        for batch in self.s.batches:
            micro_batches = micro_batches_for(batch, w)
            try:
                logits, samples = pool.run(model, seed=self.seed, x=self.inputs[batch],
                                           micro_batches=micro_batches, **self._timing_args())
            except RuntimeError as exc:
                self.skip("vit-pipeline", n, w, exc)
                continue
            timing = summarize(samples, warmup=self.s.warmup)
            self._add("vit-pipeline", n, w, batch, params, timing, logits)
            self.rows[-1]["micro_batches"] = micro_batches


def start_ray(address: str | None, settings: BenchSettings) -> bool:
    """Connect to a cluster, or start a local Ray instance with room for every worker (logical
    CPUs: more workers than cores is allowed and labelled oversubscribed). True if started here.
    Workers get the driver's priority, so the in-process baselines are compared fairly."""
    from layerpar.config import load_config
    from layerpar.parallel.cluster import connect

    cfg = load_config(None, [f"parallel.address={address}"] if address else [])
    # every W <= the cores of one N at once (both transports), or the depth pair, or the largest W
    within = [w for w in settings.workers if w <= (settings.devices or os.cpu_count() or 1)]
    return connect(cfg, min_cpus=2 * max(sum(within), 3, max(settings.workers)) + 2)


def cluster_info(gpus_per_worker: float) -> dict:
    """Nodes and devices of the connected Ray cluster; several nodes behind one IP address are a
    cluster simulated on one machine (`ray start` with distinct resources), labelled as such."""
    import ray

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    ips = {n.get("NodeManagerAddress") for n in nodes}
    res = ray.cluster_resources()
    devices = int(res.get("GPU", 0)) if gpus_per_worker > 0 else int(res.get("CPU", 0))
    return {"nodes": len(nodes), "node_ips": len(ips), "devices": devices,
            "simulated_on_one_machine": len(nodes) > 1 and len(ips) == 1,
            "resources": {k: v for k, v in res.items() if k in ("CPU", "GPU", "memory")}}


def run(preset: str, sets: list[str], *, out_dir: str, address: str | None, command: str) -> dict:
    cfg, settings = build_settings(preset, sets)
    sweep = Sweep(cfg, settings)
    started, cluster = time.time(), None
    if sweep.gpu:
        if not torch.cuda.is_available():
            return {"skipped": "no CUDA device: the gpu-one preset needs one", "preset": preset}
        sweep.run_gpu()
    else:
        torch.set_num_threads(1)  # one thread = one device, for every in-process system
        ray_started = False
        if any(s.startswith("layerpar-") for s in settings.systems):
            ray_started = start_ray(address, settings)
            if address:
                cluster = cluster_info(cfg.parallel.gpus_per_worker)
                if not settings.devices:  # workers are spread over the cluster's devices
                    sweep.devices = max(1, cluster["devices"])
        try:
            sweep.run_cpu()
            sweep.run_depth_pair()
        finally:
            if ray_started:
                import ray

                ray.shutdown()
    duration = time.time() - started
    return report.write(sweep.rows, cfg=cfg, settings=dataclasses.asdict(settings), preset=preset,
                        devices=sweep.devices, gpu=sweep.gpu, out_dir=out_dir, command=command,
                        duration_s=duration, address=address,
                        cluster=cluster, skipped=sweep.skipped, pairs=sweep.pairs)


def cli_main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--preset", default="default",
                    help=f"inference: one of {', '.join(PRESETS)}; training (layerpar/bench/"
                         f"train_sweep.py): one of {', '.join(TRAIN_PRESETS)}; LM decoding "
                         f"(layerpar/bench/lm_scale.py): one of {', '.join(LM_PRESETS)}")
    ap.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                    help="bench.<field>=value or a config override such as model.dim=256")
    ap.add_argument("--out-dir", default="runs", help="directory under which the run dir is made")
    ap.add_argument("--address", default=None, help="Ray cluster address (auto, ray://host:10001)")
    args = ap.parse_args(argv)
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # loopback only (docs/CLUSTER.md)
    os.environ.setdefault("RAY_AUTH_MODE", "token")
    command = shlex.join(["python", "launch/scale.py", *argv])
    try:
        if args.preset in LM_PRESETS:  # decoding the language model (layerpar/bench/lm_scale.py)
            from layerpar.bench.lm_scale import run as run_lm

            summary = run_lm(args.preset, args.sets, out_dir=args.out_dir, address=args.address,
                             command=command)
        elif args.preset in TRAIN_PRESETS:
            from layerpar.bench.train_sweep import run as run_train

            summary = run_train(args.preset, args.sets, out_dir=args.out_dir, command=command,
                                address=args.address)
        else:
            summary = run(args.preset, args.sets, out_dir=args.out_dir, address=args.address,
                          command=command)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        print(json.dumps({"error": str(exc)}))
        return 2
    print(json.dumps(summary))
    return 0
