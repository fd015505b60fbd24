"""Throughput of the streaming Generate server at 1, 8 and 32 concurrent generations.

    python launch/bench_generate.py                              # stdlib_lm, fresh weights, 1/8/32
    python launch/bench_generate.py --checkpoint runs/<run>      # a trained LM
    python launch/bench_generate.py --quick                      # a tiny model, 1 and 4 clients (CI)
    python launch/bench_generate.py --concurrency 1 8 32 --max-tokens 48 --set parallel.workers=2

A real gRPC server on 127.0.0.1 (serve/generate_rpc.py, continuous batching over serve.generate_slots
cache slots: --slots, default the largest concurrency) and C client threads in this process, each
sending greedy generations of --max-tokens tokens back to back (--rounds each, distinct prompts).
Per level: tokens/s (every client's tokens over the level's wall time), time per token as the
clients see it (the gap between consecutive streamed tokens of one generation) at p50/p99, time to
the first token at p50/p99, and the server's decode calls. The last stdout line is ONE JSON object:
{"bench": "generate", "levels": [...], "model": {...}, "machine": {"loadavg": ..., "cpus": ...}}.
Timings on a shared machine are noisy: quote the load average beside them.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from pathlib import Path

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_AUTH_MODE", "token")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import grpc  # noqa: E402
import numpy as np  # noqa: E402

QUICK = ["model.dim=32", "model.heads=2", "model.mlp_dim=64", "model.num_branches=2", "model.branch_depth=1",
         "model.context=64"]
PROMPTS = ["def ", "import os\n", "class A:\n    ", "for i in range(", "return ", "# ", "with open(", "x = "]


def percentile(values: list[float], q: float) -> float:
    return round(float(np.percentile(values, q)), 3) if values else 0.0


def run_level(address: str, concurrency: int, rounds: int, max_tokens: int, timeout_s: float) -> dict:
    from layerpar.serve import layerpar_v1_pb2 as pb
    from layerpar.serve import layerpar_v1_pb2_grpc as pb_grpc

    gaps: list[float] = []
    firsts: list[float] = []
    tokens = [0]
    errors: list[str] = []
    lock = threading.Lock()
    channel = grpc.insecure_channel(address)
    stub = pb_grpc.InferenceStub(channel)

    def client(c: int) -> None:
        for r in range(rounds):
            prompt = PROMPTS[(c + r) % len(PROMPTS)]
            t0 = last = time.perf_counter()
            mine, n = [], 0
            try:
                for msg in stub.Generate(pb.GenerateRequest(prompt=prompt, max_tokens=max_tokens),
                                         timeout=timeout_s):
                    now = time.perf_counter()
                    if msg.WhichOneof("event") == "token":
                        if n == 0:
                            first = now - t0
                        else:
                            mine.append(now - last)
                        n += 1
                        last = now
            except grpc.RpcError as exc:
                with lock:
                    errors.append(exc.code().name)
                continue
            with lock:
                gaps.extend(mine)
                firsts.append(first)
                tokens[0] += n

    threads = [threading.Thread(target=client, args=(c,)) for c in range(concurrency)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    channel.close()
    return {"concurrency": concurrency, "generations": concurrency * rounds - len(errors),
            "tokens": tokens[0], "wall_s": round(wall, 3), "tokens_per_s": round(tokens[0] / wall, 2),
            "ms_per_token_p50": percentile([g * 1e3 for g in gaps], 50),
            "ms_per_token_p99": percentile([g * 1e3 for g in gaps], 99),
            "ttft_ms_p50": percentile([f * 1e3 for f in firsts], 50),
            "ttft_ms_p99": percentile([f * 1e3 for f in firsts], 99), "errors": errors}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", help="an LM checkpoint or run directory (default: fresh weights)")
    ap.add_argument("--config", default="stdlib_lm", help="config without --checkpoint (default stdlib_lm)")
    ap.add_argument("--concurrency", type=int, nargs="+", help="concurrent generations per level "
                                                                "(default 1 8 32; --quick: 1 4)")
    ap.add_argument("--max-tokens", type=int, help="tokens per generation (default 32; --quick: 8)")
    ap.add_argument("--rounds", type=int, help="generations per client per level (default 3; --quick: 2)")
    ap.add_argument("--slots", type=int, help="serve.generate_slots (default: the largest concurrency)")
    ap.add_argument("--quick", action="store_true", help="a tiny model and small levels: seconds (CI)")
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    args = ap.parse_args(argv)
    levels = args.concurrency or ([1, 4] if args.quick else [1, 8, 32])
    max_tokens = args.max_tokens if args.max_tokens is not None else (8 if args.quick else 32)
    rounds = args.rounds if args.rounds is not None else (2 if args.quick else 3)
    if min(levels) < 1 or max_tokens < 1 or rounds < 1 or (args.slots is not None and args.slots < 1):
        print("error: --concurrency, --max-tokens, --rounds and --slots must be >= 1", file=sys.stderr)
        return 2
    slots = args.slots or max(levels)

    from layerpar.config import ConfigError
    from layerpar.serve.generate_rpc import GenerationServerThread
    from layerpar.serve.lm_source import apply_threads, count_params, make_decoder, open_lm
    from layerpar.train.checkpoint import CheckpointError

    sets = [*(QUICK if args.quick and not args.checkpoint else []), *args.set, "serve.port=0",
            "serve.metrics_port=-1", f"serve.generate_slots={slots}",
            f"serve.max_queue={max(256, 2 * slots)}"]
    try:
        cfg, model, ckpt_dir, _ = open_lm(args.checkpoint, config=None if args.checkpoint else args.config,
                                          sets=sets)
    except (ConfigError, CheckpointError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    apply_threads(cfg)
    decoder = make_decoder(cfg, model)
    out = {"bench": "generate", "quick": args.quick, "max_tokens": max_tokens, "rounds": rounds,
           "slots": slots,
           "threads": __import__("torch").get_num_threads(),
           "client": "threads in the server's process, grpc over 127.0.0.1",
           "model": {"kind": cfg.model.kind, "num_branches": cfg.model.num_branches, "dim": cfg.model.dim,
                     "branch_depth": cfg.model.branch_depth, "context": cfg.model.context,
                     "params": count_params(model), "workers": cfg.parallel.workers,
                     "checkpoint": str(ckpt_dir) if ckpt_dir else None},
           "levels": []}
    try:
        with GenerationServerThread(cfg, decoder) as srv:
            run_level(srv.address, 1, 1, 2, 120.0)  # warm-up: first calls allocate
            for c in levels:
                steps0 = srv.server.scheduler.steps
                level = run_level(srv.address, c, rounds, max_tokens, 600.0)
                level["decode_calls"] = srv.server.scheduler.steps - steps0
                out["levels"].append(level)
                print(f"concurrency {c:>3}: {level['tokens_per_s']:>8.1f} tokens/s  per token p50 "
                      f"{level['ms_per_token_p50']:.2f} ms  p99 {level['ms_per_token_p99']:.2f} ms",
                      file=sys.stderr, flush=True)
    finally:
        decoder.close()
    out["machine"] = {"loadavg": Path("/proc/loadavg").read_text().split()[:3]
                      if Path("/proc/loadavg").exists() else None, "cpus": os.cpu_count()}
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
