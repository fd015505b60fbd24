"""The runtime's own benchmark (issue 3): dispatch overhead, two-worker speed-up, training
throughput, depth independence, with the bytes each call moves. One run, one JSON line at the end.

    python launch/bench.py                  # ~3 minutes on 2 CPU cores
    python launch/bench.py --quick          # fewer repetitions, for a smoke test
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import ray
import torch

from layerpar.bench.harness import measure
from layerpar.bench.spmd_bench import spmd_train_step_ms
from layerpar.config import Config, load_config
from layerpar.model import ParaFormer, ViT
from layerpar.parallel.cluster import connect
from layerpar.parallel.comm import LocalComm
from layerpar.runtime.engine import Engine
from layerpar.train.optim import make_optimizer
from layerpar.train.step import train_step


@ray.remote(num_cpus=0)
class _Echo:
    def ping(self) -> None:
        return None


def _cfg(source: str, *sets: str) -> Config:
    return load_config(source, ["parallel.threads_per_worker=1", "parallel.cpus_per_worker=1",
                                *sets])


def _input(cfg: Config, batch: int) -> torch.Tensor:
    m = cfg.model
    return torch.randn(batch, m.in_channels, m.image_size, m.image_size,
                       generator=torch.Generator().manual_seed(0))


def _engine_latency(cfg: Config, x: torch.Tensor, reps: int) -> tuple[float, dict]:
    """The engine's p50 latency in ms on x, and the bytes its last call moved."""
    with Engine(cfg) as engine:
        timing, _ = measure(lambda: engine.infer(x), warmup=3, reps=reps, min_reps=5, max_seconds=20)
        return timing.p50_ms, dict(engine.last_bytes)


def _local_latency(model: torch.nn.Module, x: torch.Tensor, reps: int) -> float:
    model.eval()
    with torch.no_grad():
        timing, _ = measure(lambda: model(x), warmup=3, reps=reps, min_reps=5, max_seconds=20)
    return timing.p50_ms


def dispatch_overhead(reps: int) -> dict:
    """The runtime's fixed cost per call on a tiny model, beside a bare actor round trip."""
    echo = _Echo.remote()
    ray.get(echo.ping.remote())
    rtt, _ = measure(lambda: ray.get(echo.ping.remote()), warmup=20, reps=reps * 10, min_reps=50)
    ray.kill(echo)
    out = {"ray_roundtrip_ms": rtt.p50_ms}
    for workers in (1, 2):
        cfg = _cfg("tiny", "model.num_branches=2", f"parallel.workers={workers}")
        x = _input(cfg, 1)
        engine_ms, _ = _engine_latency(cfg, x, reps * 5)
        local_ms = _local_latency(ParaFormer(cfg.model), x, reps * 5)
        out[f"dispatch_overhead_ms_w{workers}"] = engine_ms - local_ms
        out[f"engine_latency_ms_w{workers}"] = engine_ms
    # The fixed cost per call: one worker (W = 2 adds the reduce collective, printed beside it).
    out["dispatch_overhead_ms"] = out["dispatch_overhead_ms_w1"]
    out["dispatch_vs_roundtrip"] = out["dispatch_overhead_ms"] / rtt.p50_ms
    return out


def two_worker_speedup(reps: int) -> dict:
    """The reference configuration (width 192, 8 branches x depth 2, 224x224) on W = 2 vs W = 1."""
    out = {}
    for batch in (1, 32):
        lat = {}
        for workers in (1, 2):
            cfg = _cfg("cifar10", f"parallel.workers={workers}")
            lat[workers], moved = _engine_latency(cfg, _input(cfg, batch), reps)
            out[f"latency_ms_b{batch}_w{workers}"] = lat[workers]
            out[f"bytes_b{batch}_w{workers}"] = moved
        out[f"speedup_w2_b{batch}"] = lat[1] / lat[2]
    out["speedup_w2"] = min(out["speedup_w2_b1"], out["speedup_w2_b32"])
    return out


def training_throughput(steps: int) -> dict:
    """Samples/s of train_step: W = 2 Ray Train ranks (one thread each, the SPMD path launch/train.py
    runs) vs one process (1 and 2 threads). The one-process figures are measured before and after
    the W = 2 run and pooled, so a drift of the (shared, noisy) machine meets both sides alike."""
    cfg = _cfg("fashion_mnist", "data.name=synthetic", "train.batch_size=128")
    x = _input(cfg, cfg.train.batch_size)
    y = torch.randint(0, cfg.model.num_classes, (x.shape[0],))
    samples: dict[int, list[float]] = {1: [], 2: []}

    def one_process_rounds() -> None:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            model = ParaFormer(cfg.model)
            opt = make_optimizer(model, cfg.train)

            def step(model=model, opt=opt):
                return train_step(model, opt, LocalComm(), x, y, cfg=cfg, step=0, total_steps=10**6)

            timing, _ = measure(step, warmup=3, reps=steps, min_reps=3, max_seconds=30)
            samples[threads].append(timing.p50_ms)
        torch.set_num_threads(1)

    one_process_rounds()
    # W = 2 on the SPMD path (Ray Train ranks run the step themselves; nothing goes through the driver)
    spmd = spmd_train_step_ms(cfg, workers=2, steps=max(5, 20 * steps))  # ~5 s: Ray settles
    one_process_rounds()
    out = {f"train_samples_per_s_1proc_{t}thread": x.shape[0] / (statistics.mean(ms) / 1e3)
           for t, ms in samples.items()}
    out["train_samples_per_s_w2"] = x.shape[0] / (spmd["step_ms"] / 1e3)
    out["train_speedup_w2"] = out["train_samples_per_s_w2"] / out["train_samples_per_s_1proc_1thread"]
    out["train_w2_vs_2threads"] = out["train_samples_per_s_w2"] / out["train_samples_per_s_1proc_2thread"]
    for r in spmd["ranks"]:  # what the collectives cost each rank, per step
        print(f"[bench] training W=2 rank {r['rank']} (cores {r.get('cores') or 'any'}): step "
              f"{r['step_ms']:.1f} ms = compute {r['compute_ms']:.1f} + collectives "
              f"{r['collectives_ms']:.1f} (data {r['data_ms']:.2f})", file=sys.stderr, flush=True)
    out["train_w2_ranks"] = spmd["ranks"]
    return out


def depth_independence(reps: int) -> dict:
    """N = 2 on W = 2 vs N = 1 on W = 1 (ideal 1.0), beside the serial ViT's depth 2 vs depth 1."""
    out = {}
    lat = {}
    for n in (1, 2):
        cfg = _cfg("cifar10", f"model.num_branches={n}", "model.branch_depth=1",
                   f"parallel.workers={n}")
        x = _input(cfg, 1)
        lat[n], _ = _engine_latency(cfg, x, reps)
        out[f"vit_latency_ms_depth{n}"] = _local_latency(ViT(cfg.model), x, reps)
        out[f"latency_ms_n{n}_w{n}"] = lat[n]
    out["depth_ratio_n2_n1"] = lat[2] / lat[1]
    out["vit_depth_ratio"] = out["vit_latency_ms_depth2"] / out["vit_latency_ms_depth1"]
    return out


def cli_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer repetitions (smoke test)")
    parser.add_argument("--address", default=None, help="Ray cluster address (default: local Ray)")
    args = parser.parse_args(argv)
    reps = 5 if args.quick else 20
    torch.set_num_threads(1)  # the single-process baselines get one thread, like one worker
    started = time.perf_counter()
    connect(_cfg("tiny", "parallel.workers=2", f"parallel.address={args.address}"
                 if args.address else "parallel.workers=2"))
    result: dict = {"machine": f"{torch.get_num_threads()} torch thread(s) in the driver, "
                               f"{ray.cluster_resources().get('CPU', 0):g} Ray CPUs"}
    for name, part in (("dispatch", lambda: dispatch_overhead(reps)),
                       ("speedup", lambda: two_worker_speedup(reps)),
                       ("training", lambda: training_throughput(3 if args.quick else 8)),
                       ("depth", lambda: depth_independence(reps))):
        print(f"[bench] {name} ...", file=sys.stderr, flush=True)
        result.update(part())
    result["bench_seconds"] = time.perf_counter() - started
    for key, value in result.items():
        if not isinstance(value, dict):
            print(f"{key:40s} {value:.4g}" if isinstance(value, float) else f"{key:40s} {value}")
    print(json.dumps(result))
    return 0
