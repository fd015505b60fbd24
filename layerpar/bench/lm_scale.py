"""The language-model decoding study (`launch/scale.py --preset lm`): per-token decode latency and
tokens/s by branches N, workers W and batch, for

- `paraformer-workers`: the Para-Former LM decoded over W Ray workers (runtime/lm_decode.py
  DistributedDecoder: one request per worker per token on the fast path, one reduction of (B, D));
- `paraformer-1proc`: the same model in one process (runtime/decoder.py LocalDecoder, fused stack);
- `serial-1proc`: the serial GPT of N x branch_depth blocks in one process;
- `serial-pipeline`: that GPT split into W consecutive stages on W workers (our own stage split,
  PipelinedDecoder: the hidden state (B, 1, D) goes through the driver from stage to stage).

Weights are random (seeded): decode latency does not depend on their values; each point's greedy
tokens are still checked against the one-process model. The depth pair (the headline) is measured
interleaved -- rounds alternate between its decoders -- so a load change on the machine hits both.

The cost model (fitted, in the spirit of bench/costmodel.py), per batch B:
    one process:      T(N) = a + N * b                  (a: embed, head, call; b: one branch or
                                                          branch_depth serial blocks; least squares)
    W workers:        T(N, W) = a + ceil(N / W) * b * s(W) + hop(W)
    pipeline:         T(N, W) = a + N * b + W * hop(1)
hop(W) is measured: a no-op request answered by W workers (socket round trip, pickling, driver
wake-up); s(W) = ceil(W / cores) is the time-sharing of more workers than cores.

    python launch/scale.py --preset lm             # the study (minutes; the lead runs it)
    python launch/scale.py --preset lm-tiny        # seconds: what tests/bench/test_scale_lm.py runs
    python launch/scale.py --preset lm --set bench.dim=512 --set parallel.gpus_per_worker=1
"""

from __future__ import annotations

import csv
import dataclasses
import datetime as dt
import json
import math
import os
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from layerpar.bench.harness import percentile
from layerpar.bench.presets import split_sets
from layerpar.bench.report import environment
from layerpar.config import ConfigError, load_config
from layerpar.model.lm import LMConfig, ParaFormerLM, SerialLM, generate
from layerpar.runtime.decoder import LocalDecoder

SYSTEMS = ("paraformer-workers", "paraformer-1proc", "serial-1proc", "serial-pipeline")
TARGET = 1.15  # issue 27: per-token latency of N = 2 on W = 2 over N = 1 on W = 1, batch 1


@dataclass(frozen=True)
class LMBenchSettings:
    workers: list[int] = field(default_factory=lambda: [1, 2, 4])
    """Worker counts W (Para-Former: W <= N; pipeline: 2 <= W <= N x branch_depth)."""
    branches: list[int] = field(default_factory=lambda: [1, 2, 4])
    """Branch counts N (the serial GPT stacks N x branch_depth blocks)."""
    batches: list[int] = field(default_factory=lambda: [1, 8])
    """Sequences decoded together."""
    systems: list[str] = field(default_factory=lambda: list(SYSTEMS))
    """Systems to measure."""
    dim: int = 384
    heads: int = 6
    mlp_dim: int = 1536
    branch_depth: int = 4
    vocab: int = 259
    context: int = 256
    dtype: str = "float32"
    prompt: int = 16
    """Prompt tokens prefilled before the timed steps."""
    warmup: int = 4
    """Decode steps thrown away per round."""
    tokens: int = 24
    """Timed decode steps per round (each one timed on its own)."""
    rounds: int = 3
    """Rounds per point (fresh slots each round; the depth pair's rounds alternate systems)."""
    check_tokens: int = 6
    """Greedy tokens compared with the one-process model at every point."""
    seed: int = 0


LM_PRESETS: dict[str, dict] = {
    "lm": {},
    # the depth pair only (without the pipeline: tests/ray/test_lm_decode.py checks that)
    "lm-tiny": {"workers": [1, 2], "branches": [1, 2], "batches": [1], "systems": ["paraformer-1proc"],
                "dim": 32, "heads": 2,
                "mlp_dim": 64, "branch_depth": 2, "context": 48, "prompt": 4, "warmup": 2,
                "tokens": 6, "rounds": 2, "check_tokens": 3},
}


def build(preset: str, items: list[str]):
    if preset not in LM_PRESETS:
        raise ConfigError(f"--preset {preset!r} is unknown; LM presets: {', '.join(LM_PRESETS)}")
    bench, overrides = split_sets(items, LMBenchSettings, dict(LM_PRESETS[preset]), [])
    cfg = load_config(None, overrides)
    for key in ("workers", "branches", "batches"):
        v = bench.get(key, [1])
        if not (isinstance(v, list) and v and all(isinstance(i, int) and i >= 1 for i in v)):
            raise ConfigError(f"bench.{key} ({v!r}) must be a non-empty list of positive integers")
    s = LMBenchSettings(**bench)
    unknown = sorted(set(s.systems) - set(SYSTEMS))
    if unknown:
        raise ConfigError(f"bench.systems: unknown {unknown[0]!r}; systems: {', '.join(SYSTEMS)}")
    need = s.prompt + s.warmup + s.tokens
    if need > s.context or s.check_tokens + s.prompt > s.context:
        raise ConfigError(f"bench.prompt + warmup + tokens ({need}) must fit bench.context ({s.context})")
    try:
        lm_cfg(s, 1)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    return cfg, s


def lm_cfg(s: LMBenchSettings, n: int) -> LMConfig:
    return LMConfig(vocab=s.vocab, dim=s.dim, heads=s.heads, mlp_dim=s.mlp_dim, num_branches=n,
                    branch_depth=s.branch_depth, context=s.context, dtype=s.dtype)


class Study:
    def __init__(self, cfg, s: LMBenchSettings):
        self.cfg, self.s = cfg, s
        self.cores = os.cpu_count() or 1
        gen = torch.Generator().manual_seed(s.seed)
        self.prompts = torch.randint(0, s.vocab, (max(s.batches), s.prompt), generator=gen).tolist()
        self.rows: list[dict] = []
        self.hops: dict[int, float] = {}

    def parallel(self, w: int):
        return dataclasses.replace(self.cfg.parallel, workers=w)

    def make(self, system: str, n: int, w: int):
        """(decoder, one-process reference model). With parallel.gpus_per_worker > 0 the one-process
        systems run on the driver's GPU (if it has one), the workers on one GPU each."""
        from layerpar.runtime.lm_decode import DistributedDecoder, PipelinedDecoder  # Ray: only here

        if system.startswith("paraformer"):
            model = ParaFormerLM(lm_cfg(self.s, n), seed=self.s.seed).eval()
            slots = max(self.s.batches)
            dec = LocalDecoder(self.local(model), slots) if system == "paraformer-1proc" else \
                DistributedDecoder(model, slots, self.parallel(w))
        else:
            model = SerialLM(lm_cfg(self.s, n), seed=self.s.seed).eval()
            slots = max(self.s.batches)
            dec = LocalDecoder(self.local(model), slots) if system == "serial-1proc" else \
                PipelinedDecoder(model, slots, self.parallel(w))
        return dec, model

    def local(self, model):
        gpu = self.cfg.parallel.gpus_per_worker > 0 and torch.cuda.is_available()
        return model.cuda() if gpu else model

    def round(self, dec, batch: int) -> list[float]:
        """One round: prefill `batch` prompts, warm up, time each of `tokens` steps (ms)."""
        slots = [dec.allocate() for _ in range(batch)]
        try:
            logits = dec.prefill(slots, self.prompts[:batch])
            nxt = logits.argmax(dim=-1).tolist()
            samples = []
            for i in range(self.s.warmup + self.s.tokens):
                t0 = time.perf_counter()
                nxt = dec.step(slots, nxt).argmax(dim=-1).tolist()
                if i >= self.s.warmup:
                    samples.append((time.perf_counter() - t0) * 1e3)
            return samples
        finally:
            for slot in slots:
                dec.free(slot)

    def check(self, dec, model, batch: int) -> bool:
        slots = [dec.allocate() for _ in range(batch)]
        try:
            out, logits = [], dec.prefill(slots, self.prompts[:batch])
            for _ in range(self.s.check_tokens):
                nxt = logits.argmax(dim=-1).tolist()
                out.append(nxt)
                logits = dec.step(slots, nxt)
        finally:
            for slot in slots:
                dec.free(slot)
        got = [list(r) for r in zip(*out, strict=True)]
        return got == generate(model, self.prompts[:batch], self.s.check_tokens)

    def hop(self, dec, w: int) -> None:
        """hop(W): median ms of a request W workers answer with nothing to compute (once per W)."""
        if w in self.hops:
            return
        times = []
        for _ in range(30):
            t0 = time.perf_counter()
            dec.worker_slots_used()
            times.append((time.perf_counter() - t0) * 1e3)
        self.hops[w] = statistics.median(times[5:])

    def add(self, system, n, w, batch, samples, ok, *, pair=False) -> dict:
        p50 = statistics.median(samples)
        row = {"system": system, "N": n, "W": w, "batch": batch, "blocks": n * self.s.branch_depth,
               "oversubscribed": w > self.cores, "steps": len(samples), "p50_ms": p50,
               "p95_ms": percentile(samples, 95), "mean_ms": statistics.fmean(samples),
               "tokens_per_s": batch * 1e3 / p50, "tokens_match": ok, "depth_pair": pair}
        self.rows.append(row)
        return row

    def points(self):
        s = self.s
        for n in s.branches:
            for system in s.systems:
                if system.endswith("1proc"):
                    yield system, n, 1
                elif system == "paraformer-workers":
                    yield from ((system, n, w) for w in s.workers if w <= n)
                else:
                    yield from ((system, n, w) for w in s.workers if 2 <= w <= n * s.branch_depth)

    def sweep(self) -> None:
        """Every point of bench.systems not already measured in the depth pair, one at a time."""
        done = {(r["system"], r["N"], r["W"]) for r in self.rows}
        for system, n, w in self.points():
            if (system, n, w) in done:
                continue
            dec, model = self.make(system, n, w)
            try:
                if system == "paraformer-workers":
                    self.hop(dec, w)
                for batch in self.s.batches:
                    ok = self.check(dec, model, batch)
                    samples = [t for _ in range(self.s.rounds) for t in self.round(dec, batch)]
                    self.add(system, n, w, batch, samples, ok)
            finally:
                dec.close()

    def depth_pair(self) -> None:
        """N = 1 on W = 1 and N = 2 on W = 2 (with both in one process, the serial GPT of 1x and 2x
        depth, and the 2x GPT pipelined on 2 workers when serial-pipeline is in bench.systems), alive
        together, measured in alternating rounds (a load change on the machine hits all of them)."""
        members = [("paraformer-workers", 1, 1), ("paraformer-workers", 2, 2),
                   ("paraformer-1proc", 1, 1), ("paraformer-1proc", 2, 1),  # the cost model's fit
                   ("serial-1proc", 1, 1), ("serial-1proc", 2, 1)]
        if "serial-pipeline" in self.s.systems:
            members.append(("serial-pipeline", 2, 2))
        decs = {}
        try:
            for m in members:
                decs[m] = self.make(*m)
                if m[0] == "paraformer-workers":
                    self.hop(decs[m][0], m[2])
            for batch in self.s.batches:
                oks = {m: self.check(*decs[m], batch) for m in members}
                samples: dict = {m: [] for m in members}
                for _ in range(self.s.rounds):
                    for m in members:
                        samples[m] += self.round(decs[m][0], batch)
                for m in members:
                    self.add(*m, batch, samples[m], oks[m], pair=True)
        finally:
            for dec, _ in decs.values():
                dec.close()


def fit_and_predict(rows: list[dict], hops: dict[int, float], cores: int) -> dict:
    """Fit a + N b per batch on the one-process Para-Former rows; predict every row (module doc)."""
    fits = {}
    for batch in sorted({r["batch"] for r in rows}):
        pts = [(r["N"], r["p50_ms"]) for r in rows
               if r["system"] == "paraformer-1proc" and r["batch"] == batch]
        if len({n for n, _ in pts}) < 2:
            continue
        mn, mt = statistics.fmean(n for n, _ in pts), statistics.fmean(t for _, t in pts)
        b = sum((n - mn) * (t - mt) for n, t in pts) / sum((n - mn) ** 2 for n, _ in pts)
        fits[batch] = {"a_ms": mt - b * mn, "b_ms": b}
    for r in rows:
        f = fits.get(r["batch"])
        if f is None:
            continue
        a, b, n, w = f["a_ms"], f["b_ms"], r["N"], r["W"]
        if r["system"] == "paraformer-workers" and w in hops:
            pred = a + math.ceil(n / w) * b * math.ceil(w / cores) + hops[w]
        elif r["system"] == "serial-pipeline" and 1 in hops:
            pred = a + n * b + w * hops[1]
        elif r["system"].endswith("1proc"):
            pred = a + n * b
        else:
            continue
        r["predicted_ms"] = pred
        r["model_error"] = (pred - r["p50_ms"]) / r["p50_ms"]
    return {"fits": {str(k): v for k, v in fits.items()}, "hop_ms": {str(k): v for k, v in hops.items()}}


def headline(rows: list[dict]) -> dict:
    def lat(system, n, w, batch):
        for r in rows:
            if r["depth_pair"] and (r["system"], r["N"], r["W"], r["batch"]) == (system, n, w, batch):
                return r["p50_ms"]
        return None

    def ratio(x, y):
        return None if x is None or y is None else round(x / y, 4)

    out = {}
    for batch in sorted({r["batch"] for r in rows if r["depth_pair"]}):
        sfx = "" if batch == 1 else f"_b{batch}"
        base = lat("paraformer-workers", 1, 1, batch)
        out[f"decode_depth_ratio{sfx}"] = ratio(lat("paraformer-workers", 2, 2, batch), base)
        out[f"serial_depth_ratio{sfx}"] = ratio(lat("serial-1proc", 2, 1, batch),
                                                lat("serial-1proc", 1, 1, batch))
        out[f"pipeline_depth_ratio{sfx}"] = ratio(lat("serial-pipeline", 2, 2, batch),
                                                  lat("serial-1proc", 1, 1, batch))
        out[f"per_token_ms_n1_w1{sfx}"] = base
    if out.get("decode_depth_ratio") is not None:
        out["decode_depth_target"] = TARGET
        out["decode_depth_met"] = out["decode_depth_ratio"] <= TARGET
    return out


COLUMNS = ["system", "N", "W", "batch", "blocks", "oversubscribed", "depth_pair", "steps", "p50_ms",
           "p95_ms", "mean_ms", "tokens_per_s", "predicted_ms", "model_error", "tokens_match"]


def run(preset: str, sets: list[str], *, out_dir: str, address: str | None, command: str) -> dict:
    from layerpar.parallel.cluster import connect

    cfg, s = build(preset, sets)
    torch.set_num_threads(cfg.parallel.threads_per_worker)  # one-process systems: a worker's threads
    started = time.monotonic()
    cfg_ray = load_config(None, [f"parallel.address={address}"] if address else [])
    p = cfg.parallel  # the depth pair holds 5 workers at once, then the sweep one decoder at a time
    connect(cfg_ray, min_cpus=math.ceil((5 + max(s.workers)) * p.cpus_per_worker) + 1)
    study = Study(cfg, s)
    study.depth_pair()
    study.sweep()
    model = fit_and_predict(study.rows, study.hops, study.cores)
    heads = headline(study.rows)
    run_dir = Path(out_dir) / f"scale-{preset}-{dt.datetime.now().strftime('%Y%m%d-%H%M%S-%f')}"
    run_dir.mkdir(parents=True)
    env = environment(gpu=cfg.parallel.gpus_per_worker > 0, devices=study.cores, command=command,
                      address=address)
    env["loadavg"] = Path("/proc/loadavg").read_text().split()[:3] if Path("/proc/loadavg").exists() else None
    result = {"format": "layerpar-scale-lm-v1", "preset": preset, "run_dir": str(run_dir),
              "duration_s": round(time.monotonic() - started, 1), "environment": env,
              "settings": dataclasses.asdict(s), "weights": "random (seeded): latency does not depend "
              "on the values; greedy tokens are checked against one process at every point",
              "headline": heads, "cost_model": model, "rows": study.rows}
    (run_dir / "results.json").write_text(json.dumps(result, indent=1))
    with open(run_dir / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(study.rows)
    (run_dir / "report.md").write_text(report_md(result))
    return {"run_dir": str(run_dir), "preset": preset, **heads,
            "tokens_match": all(r["tokens_match"] for r in study.rows)}


def report_md(result: dict) -> str:
    h, env = result["headline"], result["environment"]
    lines = [f"# Decode scaling ({result['preset']})", "",
             f"`{env['command']}` on {env['cpu_model']} ({env['cpu_count']} CPUs, "
             f"load {env.get('loadavg')}), "
             f"{result['duration_s']} s. {result['weights']}.", "",
             "## Depth pair (measured interleaved)", "",
             *(f"- {k}: {v}" for k, v in h.items()), "",
             "## Every point", "", "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in result["rows"]:
        cells = [r.get(c) for c in COLUMNS]
        lines.append("| " + " | ".join(f"{c:.3f}" if isinstance(c, float) else str(c) for c in cells) + " |")
    lines += ["", f"Cost model: {json.dumps(result['cost_model'])}", ""]
    return "\n".join(lines)
